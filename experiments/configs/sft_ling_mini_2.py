"""DFT chat SFT of Ling-mini-2.0 on TPU (SPEC section 11): the 4K recipe's model, chat data.

    python -m experiments.run --config=experiments/configs/sft_ling_mini_2.py \\
        --workdir=gs://bucket/sft --config.data.train_files='gs://bucket/chat/*.jsonl' \\
        --config.data.tokenizer=/path/to/tokenizer.json \\
        --config.checkpoint.init_from=gs://bucket/pretrain

Training files are JSONL, one conversation per line: {"messages": [...], "thinking": "on"}
(or a bare list of messages; `data.chat_thinking` decides the mode of those). The loss is on
assistant tokens only; packing keeps documents apart by segment ids.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import ling_mini_2
from experiments.configs.sft_quickstart import sft_config


def get_config() -> ml_collections.ConfigDict:
    cfg = sft_config(ling_mini_2.get_config())
    cfg.data.source = "files"
    cfg.train.num_steps = 2000
    cfg.optim.peak_lr = 2e-5  # Fine-tuning: well under the 3.36e-4 pretraining peak.
    cfg.schedule.type = "cosine"
    cfg.schedule.warmup_steps = 50
    cfg.schedule.total_steps = cfg.train.num_steps
    return cfg
