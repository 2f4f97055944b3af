"""The post-training configs validate and carry the chat / RL settings."""

import pytest

from experiments.configs import sft_ling_mini_2, sft_quickstart
from ling_jax.train.experiment import validate_experiment_config


def test_sft_quickstart_starts_from_the_pretraining_run():
    cfg = validate_experiment_config(sft_quickstart.get_config())
    assert cfg.data.chat and cfg.data.chat_thinking == "mixed"
    assert cfg.checkpoint.init_from and cfg.data.tokenizer.endswith("tokenizer.json")


def test_sft_ling_mini_2_needs_chat_files():
    cfg = sft_ling_mini_2.get_config()
    with pytest.raises(ValueError, match="data.train_files"):
        validate_experiment_config(cfg)
    cfg.data.train_files = "/data/chat/*.jsonl"
    cfg = validate_experiment_config(cfg)
    assert cfg.data.chat and cfg.model.num_layers == 20


def test_bad_thinking_mode_is_named():
    cfg = sft_quickstart.get_config()
    cfg.data.chat_thinking = "sometimes"
    with pytest.raises(ValueError, match="data.chat_thinking"):
        validate_experiment_config(cfg)


def test_init_from_an_hf_checkpoint(tmp_path):
    """checkpoint.init_from accepts an HF folder: the weights arrive, MTP may be absent."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from ling_jax.convert import hf
    from ling_jax.train.hf_init import _key
    from ling_jax.train.merge import initialize_weights_from
    from ling_jax.train.train_step import init_train_state
    from tests.infer.conftest import tiny_infer_model

    source = tiny_infer_model(**{"mtp.num_layers": 0})
    hf.save_pretrained(source, tmp_path / "hf")
    target = tiny_infer_model()  # With an MTP layer, other random values.
    _, state = init_train_state(target, optax.sgd(0.1))

    def leaves(state):
        return {_key(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}

    before = leaves(state.params)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    state = initialize_weights_from(str(tmp_path / "hf"), state, shardings)
    after, stored = leaves(state.params), leaves(nnx.as_pure(nnx.state(source, nnx.Param)))
    assert set(stored) < set(after)
    for key, value in after.items():
        expected = before[key] if key.startswith("mtp/") else stored[key]
        np.testing.assert_array_equal(value, expected, err_msg=key)
    bad = tiny_infer_model(hidden_size=32, **{"mtp.num_layers": 0})
    _, bad_state = init_train_state(bad, optax.sgd(0.1))
    with pytest.raises(ValueError, match="has shape"):
        initialize_weights_from(
            str(tmp_path / "hf"), bad_state, jax.tree.map(lambda a: a.sharding, bad_state)
        )
