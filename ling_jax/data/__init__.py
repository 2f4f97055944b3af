"""Input pipeline: document sources, tokenizer, packing and the grain datasets of a run.

    from ling_jax import data
    cfg = data.default_data_config()           # the `data` section of an experiment config
    train, validation, tokenizer = data.build_datasets(cfg, workdir=..., batch_size=8)
    data.check_vocab(tokenizer, model_cfg.vocab_size)
    it = iter(train)                           # grain DatasetIterator: get_state / set_state
    batch = next(it)                           # dict of [batch, seq_len] numpy arrays

The batch layout is documented in `ling_jax.data.packing`.
"""

from ling_jax.data.config import default_data_config, validate_data_config
from ling_jax.data.packing import BATCH_FEATURES, pack_examples
from ling_jax.data.pipeline import Datasets, build_datasets
from ling_jax.data.tokenizer import Tokenizer, check_vocab, load_tokenizer

__all__ = [
    "BATCH_FEATURES",
    "Datasets",
    "Tokenizer",
    "build_datasets",
    "check_vocab",
    "default_data_config",
    "load_tokenizer",
    "pack_examples",
    "validate_data_config",
]
