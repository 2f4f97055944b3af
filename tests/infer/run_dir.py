"""A work directory as `experiments.run` leaves it, built without training (shared by the
inference and the HF export tests)."""

from __future__ import annotations

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ling_jax.configs import get_preset
from ling_jax.data.tokenizer import load_tokenizer
from ling_jax.model import LingForCausalLM
from ling_jax.train.checkpointing import Checkpointer, default_checkpoint_config
from ling_jax.train.train_step import init_train_state
from tests.model.conftest import randomize

STEP = 7
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "print('hello world')\n",
    "x = [i * i for i in y]\n",
]
_logits = nnx.jit(lambda model, ids: model(ids).logits)


def make_run_dir(workdir: str) -> tuple[ml_collections.ConfigDict, jnp.ndarray, np.ndarray]:
    """Writes tokenizer/ (a BPE trained on CORPUS) and checkpoints/7/ of a random tiny model
    into `workdir`; returns its config, sample input ids and their logits."""
    load_tokenizer("", workdir, lambda: CORPUS * 20, vocab_size=300)
    cfg = get_preset("tiny")
    cfg.vocab_size = 320
    model = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    randomize(model)  # Fills every variable.
    ids = jnp.asarray([[1, 2, 3, 4, 5, 6]])
    reference = np.asarray(_logits(model, ids))
    _, state = init_train_state(model, optax.adam(1e-3))
    ckpt = default_checkpoint_config()
    ckpt.async_save, ckpt.every_steps = False, 1
    checkpointer = Checkpointer(workdir, ckpt, cfg)
    checkpointer.save(STEP, state, iter(grain.MapDataset.range(4).to_iter_dataset()), force=True)
    checkpointer.close()
    return cfg, ids, reference
