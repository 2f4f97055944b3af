"""Mid-training stage A, context extension from 4K to 32K (SPEC section 6), for a Ling 2.0 size.

    python -m experiments.run \\
        --config=experiments/configs/context_extension_32k.py:ling_mini_2 \\
        --workdir=gs://bucket/ctx32k \\
        --config.data.mixture='gs://b/long/*.arrayrecord:0.2,gs://b/pretrain/*.arrayrecord:0.8' \\
        --config.data.tokenizer=/path/to/tokenizer.json \\
        --config.checkpoint.init_from=gs://bucket/pretrain4k

The size's 4K pretraining recipe (`experiments/configs/<preset>.py`: Table 1 peak LR, AdamW,
WSM, MTP 0.1) with the stage-A changes:
  * 32K-token rows (`data.seq_len`, `model.max_position_embeddings`), packed documents masked
    per document; 20% of the rows from long (32K) documents, via `data.mixture` as above;
  * RoPE base theta 600,000, the released checkpoints' value, which the 4K recipes already
    use, so it is unchanged here; SPEC infers ([I]) that Ling's own 4K stage trained at 10,000
    (Ling-V2's 4K vs 8K/32K scripts): a 4K run trained with --config.model.rope.theta=10000
    is switched to 600,000 by this stage;
  * expert-bias update rate u = 1e-4 from the extension on (1e-3 before);
  * the chunked attention (`attention.impl = "chunked"`): no [32K, 32K] score matrix, forward
    or backward;
  * the 4K stage's tokens per step (batch * 4096 / 32768 sequences), 150B tokens in all;
  * a short re-warmup of the learning rate to the same peak (WSM: constant afterwards).
128K serving needs no training: YaRN with factor 4 over these 32K (`model.rope.scaling`,
or `python -m experiments.generate --yarn_factor=4`).

`checkpoint.init_from` names the 4K run: a fresh --workdir starts from the weights of its
latest snapshot (fresh optimizer and data position); rerunning resumes from the stage's own
snapshots.
"""

from __future__ import annotations

import importlib

import ml_collections

SEQ_LEN = 32768
ROPE_THETA = 600000.0
BIAS_UPDATE_RATE = 1e-4
TOKENS = 150e9
REWARMUP_STEPS = 100
PRESETS = ("ling_mini_2", "ling_flash_2", "ling_1t")


def get_config(preset: str = "ling_mini_2") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"context_extension_32k: unknown preset {preset!r}; known: {PRESETS}")
    cfg = importlib.import_module(f"experiments.configs.{preset}").get_config()  # 4K recipe.
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    cfg.data.seq_len = SEQ_LEN
    cfg.model.max_position_embeddings = SEQ_LEN
    cfg.model.rope.theta = ROPE_THETA
    cfg.model.attention.impl = "chunked"
    cfg.optim.bias_update_rate = BIAS_UPDATE_RATE
    cfg.train.batch_size = max(1, round(tokens_per_step / SEQ_LEN))
    cfg.train.num_steps = round(TOKENS / (cfg.train.batch_size * SEQ_LEN))
    cfg.schedule.warmup_steps = REWARMUP_STEPS
    cfg.eval.every_steps = 500
    cfg.checkpoint.every_steps = 500
    cfg.checkpoint.keep_period = 1000
    return cfg
