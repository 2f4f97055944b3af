"""Post-training (SPEC section 11): DFT chat SFT data and a small RL loop with GRPO/GSPO/LPO.

The RL loop is our own, kept small, rather than Tunix's (google-tunix 0.1.7, checked
2026-12): it resolves with our jax/flax pins but pins safetensors<0.8 and would downgrade
transformers, tokenizers and huggingface_hub and pull ~37 packages (tensorflow-datasets, numba,
kagglehub, ...); and its learners call models as `model(tokens, positions=, attention_mask=,
cache=) -> (logits, cache)` with their own samplers, not our `LingForCausalLM` and KV-cache
`Generator`. `losses.py` holds the three losses as pure functions, so registering LPO with
Tunix's `register_policy_loss_fn` later is a thin wrapper.
"""
