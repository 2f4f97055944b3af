"""`build_datasets`: the input pipeline of `python -m experiments.run`.

For every training component (stdlib / arithmetic for the embedded corpus, or each glob of
`data.mixture`) the pipeline is

  documents --split(hash)--> train docs --[process_index::process_count]--> shuffle(seed)
    --> repeat(num_epochs) --> tokenize (+EOS, shift) --> to_iter_dataset (threads)
    --> ConcatThenSplit packing --> rows [seq_len] --> window shuffle (row_shuffle_window)

and the components' rows are interleaved in their mixture proportions, then batched into
[batch_size, seq_len] numpy arrays. Everything before packing is a grain `MapDataset` indexed
by position, and packing and mixing keep small states, so `iter(train).get_state()` is a
small dict and `set_state` resumes exactly where it was: a restored run sees the same batches.

Validation is packed and batched the same way, in a fixed order (independent of the run seed);
the last batch is filled with all-padding rows (loss_mask 0), so every batch has the same shape.
Each `iter(validation)` starts over. With `data.validation_files` it is every document of this
process's shard of those files. Otherwise it is the documents held out of each component: each
component's held-out documents are packed on their own and their rows interleaved in the
training proportions, so validation measures the training mixture (holding out a fraction of
every component's documents would otherwise weight each component by its share of the corpus:
on the embedded corpus, ~40% of validation tokens were arithmetic against 10% of training
rows). Every prefix of the validation rows is mixed alike (a capped evaluation too), and no row
repeats: validation ends when the first component runs out of held-out rows, so the components
held out most abundantly relative to their weight are only partly used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grain
import ml_collections
import numpy as np
from absl import logging
from grain import experimental as grain_experimental

from ling_jax.data import embedded
from ling_jax.data.chat import chat_examples, chat_jsonl_source, chat_sources, example_features
from ling_jax.data.chunking import check_usable, text_pieces, tokenized_examples
from ling_jax.data.config import MixtureComponent, parse_mixture, validate_data_config
from ling_jax.data.packing import PadBatch, pack_examples
from ling_jax.data.sources import DocumentSource, open_documents, validation_mask
from ling_jax.data.tokenizer import Tokenizer, load_tokenizer

# Validation order does not depend on the run seed, so runs with different seeds are compared
# on the same batches.
_VALIDATION_SEED = 0x5EED
# Longest string handed to the BPE trainer.
_BPE_PIECE_CHARS = 1 << 20


class Datasets(NamedTuple):
    """What `build_datasets` returns; unpacks as (train, validation, tokenizer)."""

    train: grain.IterDataset  # Batches of [batch_size, seq_len]; iter() has get/set_state.
    validation: grain.IterDataset | None  # Finite; None when nothing is held out.
    tokenizer: Tokenizer


@dataclasses.dataclass(frozen=True)
class Component:
    """One weighted source of training documents."""

    name: str
    weight: float
    train: DocumentSource


@dataclasses.dataclass(frozen=True)
class ValidationSource:
    """Validation documents; `weight` is the share of validation rows, as in training."""

    name: str
    weight: float
    documents: DocumentSource


def split_documents(
    source: DocumentSource, fraction: float, by: str = "document"
) -> tuple[DocumentSource, DocumentSource | None]:
    """Splits by document key, or by group key with by="group" (whole groups go to one side):
    the same documents are held out on every run and host.

    At least one document is held out when `fraction` > 0 and at least one is kept.
    """
    if fraction <= 0 or len(source) < 2:
        return source, None
    keys = source.group_keys() if by == "group" else source.keys()
    held_out = validation_mask(keys, fraction)
    if not held_out.any():
        held_out = keys == keys.min()
    if held_out.all():
        held_out &= keys != keys.max()
    if not held_out.any():
        raise ValueError(
            f"data.validation_split_by={by!r}: {source!r} is a single group, so nothing can be "
            "held out; split by 'document' or set data.validation_files"
        )
    return source.subset(np.flatnonzero(~held_out)), source.subset(np.flatnonzero(held_out))


def build_sources(
    cfg: ml_collections.ConfigDict,
) -> tuple[list[Component], list[ValidationSource]]:
    """Training components and validation sources named by the `data` config.

    The validation sources are the `validation_files` (one source), or else the documents held
    out of each component, weighted as the component is in training.
    """
    if cfg.chat:
        named = chat_sources(cfg)
    elif cfg.source == "embedded":
        fraction = cfg.embedded_arithmetic_fraction
        named = [("stdlib", 1.0 - fraction, embedded.stdlib_source())]
        if fraction > 0:
            named.append(
                ("arithmetic", fraction, embedded.arithmetic_source(cfg.embedded_arithmetic_docs))
            )
    else:
        field = "mixture" if cfg.mixture else "train_files"
        specs = (
            parse_mixture(cfg.mixture) if cfg.mixture else [MixtureComponent(cfg.train_files, 1)]
        )
        # Names key the mixture's checkpoint state; a repeated glob also gets its position.
        globs = [spec.files for spec in specs]
        names = [g if globs.count(g) == 1 else f"{i}:{g}" for i, g in enumerate(globs)]
        named = [
            (
                name,
                spec.weight,
                open_documents(
                    spec.files, field=field, file_format=cfg.file_format, text_key=cfg.text_key
                ),
            )
            for name, spec in zip(names, specs, strict=True)
        ]
    if cfg.validation_files and cfg.chat:
        held_out = chat_jsonl_source(cfg.validation_files, field="validation_files")
        validation = [ValidationSource("validation", 1.0, held_out)]
        return [Component(n, w, s) for n, w, s in named], validation
    if cfg.validation_files:
        validation = [
            ValidationSource(
                "validation",
                1.0,
                open_documents(
                    cfg.validation_files,
                    field="validation_files",
                    file_format=cfg.file_format,
                    text_key=cfg.text_key,
                ),
            )
        ]
        return [Component(n, w, s) for n, w, s in named], validation
    components, validation = [], []
    for name, weight, source in named:
        train, held_out = split_documents(source, cfg.validation_fraction, cfg.validation_split_by)
        components.append(Component(name, weight, train))
        if held_out is not None:
            validation.append(ValidationSource(name, weight, held_out))
    return components, validation


def tokenizer_corpus(
    components: Sequence[Component], max_bytes: int = 0, max_chars: int = _BPE_PIECE_CHARS
) -> Iterator[str]:
    """Training documents for the BPE, drawn from the components in their proportions of bytes.

    Each component is read in a fixed pseudo-random order (by document key), so a byte cap
    still samples all of it. Stops when a component runs out or after `max_bytes` (0 = no cap).
    Documents longer than `max_chars` are yielded in pieces, so that the trainer spreads a
    huge document over its threads (pieces longer than any stdlib file leave the embedded
    corpus's BPE as it was).
    """
    orders = [np.argsort(c.train.keys(), kind="stable") for c in components]
    consumed = [0] * len(components)
    seen = np.zeros((len(components),), np.float64)
    weights = np.array([c.weight for c in components], np.float64)
    total = 0
    while True:
        i = int(np.argmin(seen / weights))
        if consumed[i] == len(orders[i]):
            return
        doc = components[i].train[int(orders[i][consumed[i]])]
        consumed[i] += 1
        size = len(doc.encode("utf-8"))
        seen[i] += size
        total += size
        yield from text_pieces(doc, max_chars)
        if max_bytes and total >= max_bytes:
            return


def _shard(source: DocumentSource, process_index: int, process_count: int) -> DocumentSource:
    """Documents process_index, process_index + process_count, ... of `source`."""
    return source.subset(np.arange(len(source))[process_index::process_count])


def _read_options(cfg: ml_collections.ConfigDict) -> grain.ReadOptions:
    return grain.ReadOptions(
        num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size
    )


def _examples(
    order: grain.MapDataset, documents: DocumentSource, tokenizer: Tokenizer, cfg
) -> grain.IterDataset:
    if cfg.chat:  # Conversations are short: whole, never cut into chunks.
        return chat_examples(
            order, documents, tokenizer, thinking=cfg.chat_thinking, read_options=_read_options(cfg)
        )
    return tokenized_examples(
        order,
        documents,
        tokenizer,
        add_eos=cfg.add_eos,
        max_chars=cfg.document_chunk_chars,
        read_options=_read_options(cfg),
    )


def _component_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _prefetch(ds: grain.IterDataset, cfg: ml_collections.ConfigDict) -> grain.IterDataset:
    if not cfg.batch_prefetch:
        return ds
    return grain_experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.batch_prefetch)


def _train_rows(
    component: Component,
    cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    *,
    seed: int,
    process_index: int,
    process_count: int,
) -> grain.IterDataset:
    shard = _shard(component.train, process_index, process_count)
    if not len(shard):
        raise ValueError(
            f"training source {component.name!r}: {len(component.train)} documents cannot give "
            f"each of {process_count} processes one"
        )
    logging.info(
        "process %d of %d reads %d of the %d training documents of %r",
        process_index,
        process_count,
        len(shard),
        len(component.train),
        component.name,
    )
    where = f"process {process_index} of {process_count}: " if process_count > 1 else ""
    check_usable(
        shard,
        tokenizer,
        add_eos=cfg.add_eos,
        max_chars=cfg.document_chunk_chars,
        what=f"{where}training source {component.name!r}",
    )
    order = grain.MapDataset.range(len(shard))
    if cfg.shuffle:
        order = order.shuffle(seed)
    order = order.repeat(None if cfg.num_epochs == 0 else cfg.num_epochs)
    rows = pack_examples(
        _examples(order, shard, tokenizer, cfg),
        seq_len=cfg.seq_len,
        pad_id=tokenizer.pad_id,
        features=example_features(cfg),
    )
    if cfg.shuffle and cfg.row_shuffle_window:
        rows = grain_experimental.WindowShuffleIterDataset(
            rows, window_size=cfg.row_shuffle_window, seed=seed
        )
    return rows


class _PadToCountIterDataset(grain.IterDataset):
    """Exactly `count` elements: the parent's first ones, then copies of `filler`.

    Lets every host run the same number of validation steps whatever its shard holds.
    """

    def __init__(self, parent: grain.IterDataset, count: int, filler: Any):
        super().__init__(parent)
        self._count = count
        self._filler = filler

    def __iter__(self) -> grain.DatasetIterator:
        return _PadToCountIterator(self._parent.__iter__(), self._count, self._filler)


class _PadToCountIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, count: int, filler: Any):
        super().__init__(parent)
        self._count, self._filler = count, filler
        self._emitted, self._exhausted = 0, False

    def __next__(self):
        if self._emitted >= self._count:
            raise StopIteration
        self._emitted += 1
        if not self._exhausted:
            try:
                return next(self._parent)
            except StopIteration:
                self._exhausted = True
        return self._filler

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "emitted": self._emitted,
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._emitted, self._exhausted = state["emitted"], state["exhausted"]


def _validation_batches(
    sources: Sequence[ValidationSource],
    cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    process_index: int,
    process_count: int,
) -> grain.IterDataset | None:
    if not sources:
        return None

    def packed_rows(documents: DocumentSource, seed: int) -> grain.IterDataset:
        order = grain.MapDataset.range(len(documents)).shuffle(seed)
        return pack_examples(
            _examples(order, documents, tokenizer, cfg),
            seq_len=cfg.seq_len,
            pad_id=tokenizer.pad_id,
            features=example_features(cfg),
        )

    # A shard may be empty on some hosts (a fixed validation_max_batches pads it); a component
    # with nothing on this host is left out of its mixture rather than ending it at once.
    shards = [
        (i, s, _shard(s.documents, process_index, process_count)) for i, s in enumerate(sources)
    ]
    shards = [shard for shard in shards if len(shard[2])] or shards[:1]
    if len(shards) == 1:
        ((_, _, docs),) = shards
        rows = packed_rows(docs, _VALIDATION_SEED)
    else:
        rows = grain.IterDataset.mix(
            {
                s.name: packed_rows(docs, _component_seed(_VALIDATION_SEED, i))
                for i, s, docs in shards
            },
            {s.name: s.weight for _, s, _ in shards},
        )
    batches = rows.batch(batch_size, batch_fn=PadBatch(batch_size, cfg.seq_len, tokenizer.pad_id))
    if cfg.validation_max_batches:
        filler = PadBatch(batch_size, cfg.seq_len, tokenizer.pad_id)([])
        batches = _PadToCountIterDataset(batches, cfg.validation_max_batches, filler)
    return _prefetch(batches, cfg)


def build_datasets(
    data_cfg: ml_collections.ConfigDict,
    *,
    workdir: str | None,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
) -> Datasets:
    """Builds this process's training and validation batches and the tokenizer.

    Args:
      data_cfg: the `data` section (`ling_jax.data.default_data_config()`), validated here.
      workdir: the run's folder; the trained tokenizer is cached in `<workdir>/tokenizer/`.
      batch_size: rows per batch on this process (the global batch / process_count).
      process_index, process_count: this host's shard: process p reads documents
        p, p + count, ... of every source, so hosts never share a document.
      seed: shuffle seed; `data_cfg.shuffle_seed` when None.

    With `data.worker_count` > 0 batches come from grain worker processes, which read absl
    flags: call this after flags are parsed (as under `absl.app.run`).

    Returns:
      `Datasets(train, validation, tokenizer)`. `train` is a grain `IterDataset` of dicts of
      [batch_size, seq_len] numpy arrays (layout in `ling_jax.data.packing`), infinite when
      num_epochs=0; `iter(train)` is a `grain.DatasetIterator` with get_state/set_state.
    """
    cfg = validate_data_config(data_cfg)
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} is invalid: expected >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index = {process_index} is not in [0, {process_count})")
    seed = cfg.shuffle_seed if seed is None else seed
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed = {seed} is invalid: expected an integer in [0, 2**32)")

    components, validation_sources = build_sources(cfg)
    for c in components:
        logging.info(
            "data component %r: weight %.3g, %d training documents", c.name, c.weight, len(c.train)
        )
    tokenizer = load_tokenizer(
        cfg.tokenizer,
        workdir,
        lambda: tokenizer_corpus(components, cfg.tokenizer_train_max_bytes),
        vocab_size=cfg.bpe_vocab_size,
        eos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
    )

    rows = {
        c.name: _train_rows(
            c,
            cfg,
            tokenizer,
            seed=_component_seed(seed, i),
            process_index=process_index,
            process_count=process_count,
        )
        for i, c in enumerate(components)
    }
    if len(rows) == 1:
        (train_rows,) = rows.values()
    else:
        train_rows = grain.IterDataset.mix(rows, {c.name: c.weight for c in components})
    train = train_rows.batch(batch_size, drop_remainder=True)
    if cfg.worker_count:
        train = train.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    train = _prefetch(train, cfg)
    validation = _validation_batches(
        validation_sources,
        cfg,
        tokenizer,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return Datasets(train, validation, tokenizer)
