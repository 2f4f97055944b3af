"""The RL loop on a tiny random model: the rollout batch layout and one update on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import rl_quickstart
from ling_jax.data import chat, load_tokenizer
from ling_jax.posttrain import rl, rollout
from tests.infer.conftest import tiny_infer_model


@pytest.fixture(scope="module")
def tokenizer():
    docs = [chat.ArithmeticChatReader(200).read(i) for i in range(200)]
    return load_tokenizer("", None, docs, vocab_size=300)


@pytest.fixture(scope="module")
def run(tokenizer):
    config = rl_quickstart.get_config()
    config.rl.update(
        init_from="<in memory>",
        prompts_per_step=2,
        group_size=2,
        max_new_tokens=6,
        eval_problems=4,  # The rollout's batch bucket: no recompile.
        kl_beta=0.1,
        loss="lpo",
    )
    model = tiny_infer_model(vocab_size=320, **{"mtp.num_layers": 0})
    return rl.RLRun(config, model=model, tokenizer=tokenizer)


def test_rollout_batch_layout():
    prompts = rollout.Prompts(tokens=[np.array([5, 6, 7], np.int32)], answers=[1])
    replies = rollout.Replies(tokens=[[8, 9], [4]], texts=["", ""])
    batch = rollout.rollout_batch(prompts, replies, group_size=2, pad_id=0)
    assert batch["input_ids"].shape == (2, 16)
    np.testing.assert_array_equal(batch["input_ids"][0, :5], [5, 6, 7, 8, 0])
    np.testing.assert_array_equal(batch["targets"][0, :4], [6, 7, 8, 9])
    # Targets 8 and 9 (positions 2, 3) are the reply; the prompt's own targets are not.
    np.testing.assert_array_equal(batch["completion_mask"][0, :5], [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(batch["reply_tokens"][0, :5], [0, 0, 8, 9, 0])
    np.testing.assert_array_equal(batch["completion_mask"][1, :4], [0, 0, 1, 0])
    np.testing.assert_array_equal(batch["segment_ids"][1, :4], [1, 1, 1, 0])


def test_pause_tokens_end_sentences(tokenizer):
    pause = rollout.pause_token_ids(tokenizer)
    assert tokenizer.encode(".")[0] in pause and tokenizer.encode(";")[0] in pause
    assert tokenizer.encode("7")[0] not in pause


def test_one_rl_step_updates_the_policy(run):
    metrics = run.step(0)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert {"reward", "accuracy", "kl", "policy_loss", "clip_fraction"} <= set(metrics)
    assert int(run.state.step) == 1
    # Hand-made advantages on a real rollout: with old_logp = the policy's own log-probs every
    # ratio is 1, so the loss is minus the token mean of the advantages, and the update moves.
    prompts = rollout.arithmetic_prompts(run.tokenizer, [0, 1], seed=0)
    run.sync_generator()  # The update donated the weights the generator held.
    replies = rollout.sample_replies(
        run.generator,
        run.tokenizer,
        prompts,
        group_size=2,
        max_new_tokens=6,
        sampling=rl.SamplingConfig(temperature=1.0),
        seed=3,
    )
    batch = rollout.rollout_batch(prompts, replies, group_size=2, pad_id=run.tokenizer.pad_id)
    logp = run.logp_fn(run.state.params, run.state.expert_bias, batch)
    advantages = jnp.array([1.0, -1.0, 0.5, -0.5])
    mask = batch["completion_mask"]
    expected = -(mask * advantages[:, None]).sum() / mask.sum()
    params = jax.tree.map(np.asarray, run.state.params)
    run.state, metrics = run.step_fn(run.state, batch, logp, logp, advantages)
    np.testing.assert_allclose(metrics["policy_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], 0.0, atol=1e-6)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params, run.state.params)
    assert max(jax.tree.leaves(moved)) > 0
    accuracy = run.evaluate()
    assert 0.0 <= accuracy <= 1.0


def test_bad_rl_config_is_named():
    cfg = rl.default_rl_config()
    cfg.init_from = "runs/sft"
    cfg.loss = "ppo"
    with pytest.raises(ValueError, match="rl.loss"):
        rl.validate_rl_config(cfg)
    cfg.loss, cfg.group_size = "lpo", 1
    with pytest.raises(ValueError, match="rl.group_size"):
        rl.validate_rl_config(cfg)
