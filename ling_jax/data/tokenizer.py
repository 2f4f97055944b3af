"""Tokenizers: any Hugging Face `tokenizer.json`, or a byte-level BPE trained once and cached.

`load_tokenizer` returns a `Tokenizer`, a thin wrapper over `tokenizers.Tokenizer` that fixes the
special ids the pipeline needs (`eos_id`, `pad_id`), encodes without the tokenizer's own special
tokens (the pipeline adds EOS itself), and knows how many UTF-8 bytes every token stands for
(`token_bytes`), which turns a loss in nats per token into bits per byte.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ling_jax.io import paths

EOS_TOKEN = "<|endoftext|>"
# Tried in order when neither the config nor a tokenizer_config.json names the EOS token.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")
_CACHE_DIR = "tokenizer"
_CACHE_FILE = "tokenizer.json"
_META_FILE = "meta.json"


@functools.lru_cache(maxsize=1)
def _byte_level_decoding() -> dict[str, int]:
    """Inverse of GPT-2's bytes-to-unicode table: the character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tok: tokenizers.Tokenizer) -> bool:
    spec = json.loads(tok.to_str())
    return "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(
        spec.get("pre_tokenizer")
    )


def _token_byte_lengths(tok: tokenizers.Tokenizer, size: int) -> np.ndarray:
    """UTF-8 bytes of every token id: [size] int32; 0 for special tokens and unused ids.

    Exact for byte-level tokenizers (each token is a fixed byte string); for others an
    estimate from the token's text ("▁" counts as a space, "<0xNN>" as one byte).
    """
    lengths = np.zeros((size,), np.int32)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    decoding = _byte_level_decoding() if _is_byte_level(tok) else None
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if token in special:
            continue
        if decoding is not None and all(c in decoding for c in token):
            lengths[i] = len(token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            lengths[i] = 1
        else:
            lengths[i] = len(token.replace("▁", " ").removeprefix("##").encode("utf-8"))
    return lengths


class Tokenizer:
    """A `tokenizers.Tokenizer` with the pipeline's special ids and byte accounting."""

    def __init__(self, tok: tokenizers.Tokenizer, *, eos_token: str, pad_token: str = ""):
        self.hf = tok
        self.eos_id = self._token_id(eos_token, "eos_token")
        self.pad_id = self._token_id(pad_token or eos_token, "pad_token")
        # Ids need not be contiguous; the model's embedding must cover the largest one.
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        self.token_bytes = _token_byte_lengths(tok, self.vocab_size)  # [vocab_size] int32

    def _token_id(self, token: str, field: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise ValueError(f"data.{field} = {token!r} is not in the tokenizer's vocabulary")
        return i

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, no special tokens added: [num_tokens] int32."""
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.hf.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False
        )

    def num_bytes(self, ids: Sequence[int] | np.ndarray) -> int:
        """UTF-8 bytes that the tokens `ids` stand for (special tokens count 0)."""
        return int(self.token_bytes[np.asarray(ids, dtype=np.int64)].sum())

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises if the tokenizer emits ids the model's embedding table cannot hold."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer vocabulary ({tokenizer.vocab_size} ids) exceeds the model's "
            f"vocab_size={model_vocab_size}: raise model.vocab_size to at least "
            f"{tokenizer.vocab_size} or use a smaller tokenizer (data.bpe_vocab_size)"
        )


def train_bpe(corpus: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Trains a GPT-2-style byte-level BPE with `EOS_TOKEN` as its only special token."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _special_from_config(path: str, name: str) -> str:
    """`name` ("eos_token", "pad_token") from a tokenizer_config.json beside `path`, or ""."""
    config_path = paths.join(paths.dirname(path), "tokenizer_config.json")
    if not paths.exists(config_path):
        return ""
    value = json.loads(paths.read_text(config_path)).get(name) or ""
    return value.get("content", "") if isinstance(value, dict) else value


def _load_file(path: str, eos_token: str, pad_token: str) -> Tokenizer:
    if paths.isdir(path):
        path = paths.join(path, _CACHE_FILE)
    try:  # Read through the path layer: `from_file` only opens local files.
        tok = tokenizers.Tokenizer.from_str(paths.read_text(path))
    except Exception as e:  # tokenizers raises a bare Exception for missing / bad files.
        raise ValueError(f"data.tokenizer = {path!r}: cannot load a tokenizer.json ({e})") from e
    eos_token = eos_token or _special_from_config(path, "eos_token")
    if not eos_token:
        vocab = tok.get_vocab(with_added_tokens=True)
        eos_token = next((t for t in _EOS_CANDIDATES if t in vocab), "")
        if not eos_token:
            raise ValueError(
                f"data.tokenizer = {path!r}: no EOS token found among {_EOS_CANDIDATES}; "
                "set data.eos_token"
            )
    pad_token = pad_token or _special_from_config(path, "pad_token")
    return Tokenizer(tok, eos_token=eos_token, pad_token=pad_token)


def load_tokenizer(
    spec: str,
    workdir: str | None,
    corpus_iter: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    *,
    vocab_size: int = 1024,
    eos_token: str = "",
    pad_token: str = "",
) -> Tokenizer:
    """Loads `spec` (a tokenizer.json or its folder), or, for spec="", a cached trained BPE.

    With spec="", `<workdir>/tokenizer/tokenizer.json` is reused when present; otherwise a
    byte-level BPE of `vocab_size` is trained on `corpus_iter` (an iterable of documents, or a
    function returning one, called only when training is needed) and written there. Training is
    deterministic, so hosts that race to write the cache write the same file. A cached tokenizer
    trained for another vocab_size is an error rather than a silent retrain: checkpoints in the
    workdir depend on it. workdir=None trains without caching.
    """
    if spec:
        return _load_file(spec, eos_token, pad_token)
    cache = meta_path = None
    if workdir is not None:
        cache_dir = paths.join(workdir, _CACHE_DIR)
        cache, meta_path = paths.join(cache_dir, _CACHE_FILE), paths.join(cache_dir, _META_FILE)
        if paths.exists(cache):
            if paths.exists(meta_path):
                cached_size = json.loads(paths.read_text(meta_path)).get("bpe_vocab_size")
                if cached_size != vocab_size:
                    raise ValueError(
                        f"data.bpe_vocab_size = {vocab_size} but the cached tokenizer {cache} "
                        f"was trained with {cached_size}; delete it or use another workdir"
                    )
            return _load_file(cache, eos_token or EOS_TOKEN, pad_token)
    if corpus_iter is None:
        raise ValueError("training a tokenizer (data.tokenizer = '') needs a corpus")
    corpus = corpus_iter() if callable(corpus_iter) else corpus_iter
    tok = train_bpe(corpus, vocab_size)
    if cache is not None:
        # Concurrent hosts never read a half-written file (see `paths.write_text`).
        paths.makedirs(cache_dir)
        paths.write_text(cache, tok.to_str())
        paths.write_text(meta_path, json.dumps({"bpe_vocab_size": vocab_size}))
    return Tokenizer(tok, eos_token=eos_token or EOS_TOKEN, pad_token=pad_token)
