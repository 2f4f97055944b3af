"""The `data` section of an experiment config: where documents come from and how they are packed.

`default_data_config()` returns the section with every field documented; `validate_data_config`
checks it once at start-up and raises a `ValueError` naming the offending field.

Sources (`data.source`):
  "embedded"  no download: the Python standard library's own `*.py` files on this machine
              (test suites excluded), mixed with a generated arithmetic-reasoning set.
  "files"     the user's documents, selected by glob (`data.train_files` or `data.mixture`).

Mixture weights (`data.mixture`, and the embedded arithmetic fraction) are proportions of packed
rows, that is of training tokens, not of documents: each component is packed on its own and the
packed rows are interleaved in the given proportions.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

SOURCES = ("embedded", "files")
FILE_FORMATS = ("auto", "text", "jsonl", "parquet", "arrayrecord")
# 256 byte symbols plus at least one special token.
MIN_BPE_VOCAB_SIZE = 257


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults sized for the CPU quickstart on the embedded corpus."""
    cfg = ml_collections.ConfigDict()
    # "embedded" (stdlib source + arithmetic, no download) or "files" (globs below).
    cfg.source = "embedded"
    # Globs of training documents; several globs separated by commas. Used when source="files"
    # and `mixture` is empty.
    cfg.train_files = ""
    # Globs of validation documents. Empty: hold out `validation_fraction` of the training
    # documents of every component, chosen by a hash of (file name, record index).
    cfg.validation_files = ""
    # How to read a file: "auto" picks by extension (.jsonl/.json/.ndjson -> jsonl, .parquet ->
    # parquet, *array_record* / .arrayrecord -> arrayrecord, anything else -> text, one document
    # per file).
    cfg.file_format = "auto"
    # Field of a JSONL object / Parquet column / JSON ArrayRecord record holding the text.
    cfg.text_key = "text"
    # Weighted training sources, "GLOB:WEIGHT,GLOB:WEIGHT" (one glob per component); weights are
    # relative proportions of packed rows. Replaces `train_files` when set (source="files").
    cfg.mixture = ""
    # Embedded source only: proportion of packed training rows drawn from the generated
    # arithmetic set (0 disables it), and how many arithmetic documents exist before repeating.
    cfg.embedded_arithmetic_fraction = 0.1
    cfg.embedded_arithmetic_docs = 20000

    # "" trains a byte-level BPE on the training split (cached in <workdir>/tokenizer/), or a
    # path to a Hugging Face `tokenizer.json` (or to the folder holding it).
    cfg.tokenizer = ""
    # Vocabulary size of the trained BPE (special tokens included).
    cfg.bpe_vocab_size = 1024
    # Cap on the UTF-8 bytes of training text the BPE sees (drawn from the components in their
    # mixture proportions); 0 = no cap. The embedded corpus is ~12 MB.
    cfg.tokenizer_train_max_bytes = 100_000_000
    # Special tokens of a `tokenizer.json`; "" reads them from a `tokenizer_config.json` beside
    # it, else tries common names. The pad token defaults to the EOS token.
    cfg.eos_token = ""
    cfg.pad_token = ""
    # Append EOS to every document so the model learns where documents end.
    cfg.add_eos = True
    # Chat SFT (`ling_jax.data.chat`): documents are conversations rendered with Ling's chat
    # template, and only assistant tokens are trained. source="embedded" then gives the
    # arithmetic set as conversations; source="files" reads JSONL, one conversation per line.
    cfg.chat = False
    # Thinking mode of conversations that do not name theirs: "on", "off" or "mixed" (half each).
    cfg.chat_thinking = "mixed"

    # Tokens per packed row.
    cfg.seq_len = 256
    # Fraction of documents held out for validation when `validation_files` is empty. The
    # held-out documents of the components are mixed by rows in the training proportions.
    cfg.validation_fraction = 0.05
    # What that fraction counts: "document" holds out single documents; "group" holds out
    # whole groups (a file of `train_files` / `mixture`, a top-level stdlib package), so that
    # near-duplicate documents (one package's modules, one shard's records) never straddle
    # the split. Generated arithmetic documents are groups of their own.
    cfg.validation_split_by = "document"
    # Validation batches per evaluation; 0 = the whole (finite) validation split.
    cfg.validation_max_batches = 0
    # Shuffle of training documents (global, reshuffled every epoch); the seed passed to
    # `build_datasets` overrides `shuffle_seed` when given.
    cfg.shuffle = True
    cfg.shuffle_seed = 0
    # Packed rows shuffled in consecutive windows of this many rows, per component (0 = off).
    # Packing lays a long document out as consecutive rows (a 700 KB source file fills over a
    # thousand rows), so without it a few documents can fill the end of a short run. Checkpointable;
    # the first batch waits for the first window to be tokenized.
    cfg.row_shuffle_window = 0
    # Passes over the training documents; 0 repeats forever (the trainer counts steps). With
    # several components, training ends when the first runs out. Hosts hold different numbers
    # of tokens, so multi-host runs should repeat forever and stop on a step count.
    cfg.num_epochs = 0
    # How processes split the data: "documents" (each reads a disjoint shard of the documents:
    # scales to any corpus) or "rows" (each builds the global batch and keeps its own rows:
    # batches independent of the process count, e.g. to check multi-host runs against one).
    cfg.process_sharding = "documents"
    # Threads reading and tokenizing documents, and documents they may run ahead.
    cfg.read_threads = 2
    cfg.prefetch_buffer_size = 64
    # Documents longer than this many characters are tokenized (and fed to the BPE trainer)
    # in chunks of this size as training reaches them, so the read-ahead buffer holds at most
    # prefetch_buffer_size chunks, not whole documents of any length.
    cfg.document_chunk_chars = 65536
    # Batches prepared ahead in a background thread (0 = none); checkpointable.
    cfg.batch_prefetch = 2
    # Worker processes producing training batches (grain `mp_prefetch`); 0 = in-process.
    # Deterministic and checkpointable, but batches depend on the worker count.
    cfg.worker_count = 0
    return cfg


@dataclasses.dataclass(frozen=True)
class MixtureComponent:
    """One weighted source of training documents."""

    files: str  # One glob, or comma-separated globs.
    weight: float


def parse_mixture(spec: str) -> list[MixtureComponent]:
    """Parses "GLOB:WEIGHT,GLOB:WEIGHT" (the weight follows the last colon of each item)."""
    components = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        glob, sep, weight_text = item.rpartition(":")
        try:
            weight = float(weight_text) if sep else math.nan
        except ValueError:
            weight = math.nan
        if not glob or not (weight > 0 and math.isfinite(weight)):
            _fail("mixture", spec, f"items GLOB:WEIGHT with a positive weight; bad item {item!r}")
        components.append(MixtureComponent(files=glob, weight=weight))
    if not components:
        _fail("mixture", spec, "at least one GLOB:WEIGHT item")
    return components


def _fail(field: str, value, expected: str) -> None:
    raise ValueError(
        f"data config field `data.{field}` = {value!r} is invalid: expected {expected}"
    )


def validate_data_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the `data` section once, naming the offending field; returns it unchanged."""
    if cfg.source not in SOURCES:
        _fail("source", cfg.source, f"one of {SOURCES}")
    if cfg.file_format not in FILE_FORMATS:
        _fail("file_format", cfg.file_format, f"one of {FILE_FORMATS}")
    if not cfg.text_key:
        _fail("text_key", cfg.text_key, "a non-empty field name")
    if cfg.source == "embedded":
        for field in ("train_files", "mixture"):
            if cfg[field]:
                _fail(
                    field, cfg[field], 'empty when data.source="embedded" (or set source="files")'
                )
    if cfg.source == "files":
        if cfg.mixture and cfg.train_files:
            _fail("mixture", cfg.mixture, "empty when data.train_files is set (set only one)")
        if not cfg.mixture and not cfg.train_files.strip(" ,"):
            _fail("train_files", cfg.train_files, 'a glob when data.source="files"')
        if cfg.mixture:
            parse_mixture(cfg.mixture)
    if not 0 <= cfg.embedded_arithmetic_fraction < 1:
        _fail("embedded_arithmetic_fraction", cfg.embedded_arithmetic_fraction, "in [0, 1)")
    if cfg.embedded_arithmetic_docs < 1:
        _fail("embedded_arithmetic_docs", cfg.embedded_arithmetic_docs, ">= 1")
    if not cfg.tokenizer and cfg.bpe_vocab_size < MIN_BPE_VOCAB_SIZE:
        _fail("bpe_vocab_size", cfg.bpe_vocab_size, f">= {MIN_BPE_VOCAB_SIZE}")
    if cfg.tokenizer_train_max_bytes < 0:
        _fail("tokenizer_train_max_bytes", cfg.tokenizer_train_max_bytes, ">= 0 (0 = no cap)")
    if cfg.chat_thinking not in ("on", "off", "mixed"):
        _fail("chat_thinking", cfg.chat_thinking, "'on', 'off' or 'mixed'")
    if cfg.seq_len < 2:
        _fail("seq_len", cfg.seq_len, ">= 2")
    if not 0 <= cfg.validation_fraction < 1:
        _fail("validation_fraction", cfg.validation_fraction, "in [0, 1)")
    if cfg.validation_split_by not in ("document", "group"):
        _fail("validation_split_by", cfg.validation_split_by, "'document' or 'group'")
    if cfg.validation_max_batches < 0:
        _fail("validation_max_batches", cfg.validation_max_batches, ">= 0 (0 = all)")
    if cfg.row_shuffle_window < 0:
        _fail("row_shuffle_window", cfg.row_shuffle_window, ">= 0 (0 = off)")
    if not 0 <= cfg.shuffle_seed < 2**32:
        _fail("shuffle_seed", cfg.shuffle_seed, "in [0, 2**32)")
    if cfg.process_sharding not in ("documents", "rows"):
        _fail("process_sharding", cfg.process_sharding, "'documents' or 'rows'")
    if cfg.num_epochs < 0:
        _fail("num_epochs", cfg.num_epochs, ">= 0 (0 = repeat forever)")
    if cfg.read_threads < 1:
        _fail("read_threads", cfg.read_threads, ">= 1")
    if cfg.prefetch_buffer_size < 1:
        _fail("prefetch_buffer_size", cfg.prefetch_buffer_size, ">= 1")
    if cfg.document_chunk_chars < 256:
        _fail("document_chunk_chars", cfg.document_chunk_chars, ">= 256")
    if cfg.worker_count < 0:
        _fail("worker_count", cfg.worker_count, ">= 0 (0 = in-process)")
    if cfg.batch_prefetch < 0:
        _fail("batch_prefetch", cfg.batch_prefetch, ">= 0 (0 = no background thread)")
    return cfg
