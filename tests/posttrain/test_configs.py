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
