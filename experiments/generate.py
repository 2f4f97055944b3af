"""Talk to a model: load a run's snapshot or a Hugging Face checkpoint and stream its reply.

    python -m experiments.generate --checkpoint=runs/quickstart --prompt='def fib(n):'
    python -m experiments.generate --hf_dir=/models/Ling-mini-2.0 --prompt='Why is the sky blue?' \\
        --thinking=on --temperature=0.7 --top_p=0.95 --max_new_tokens=512
    # 128K context on a 32K-trained model: YaRN, factor 4 (SPEC 4.3), chunked prefill attention.
    python -m experiments.generate --hf_dir=... --prompt_file=long.txt --yarn_factor=4 \\
        --attention_impl=chunked

--checkpoint is an `experiments.run` workdir: the latest snapshot's params (or --step's), with
the model config from the snapshot (or from --config, an experiment config file). Its tokenizer
defaults to `<workdir>/tokenizer/tokenizer.json`; an HF directory's to its own tokenizer.json.
A tokenizer whose tokenizer_config.json has a chat_template (Ling's) turns the prompt into a
user turn of Ling's chat format with `detailed thinking on|off`; otherwise the prompt is
continued as plain text. One prompt streams token by token; several (--prompt repeated) run
as one batch. Prefill and decode throughput are printed at the end (after a warm-up compile).
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from ling_jax.data.tokenizer import Tokenizer, load_tokenizer
from ling_jax.infer import Generator, SamplingConfig, apply_chat_template, load_checkpoint
from ling_jax.infer.chat import generation_stop_ids, load_tokenizer_config
from ling_jax.infer.generator import NO_TOKEN
from ling_jax.infer.loading import snapshot_model_config
from ling_jax.io import paths
from ling_jax.train.finite import NonFiniteError, first_nonfinite_leaf

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (its .model).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "An experiments.run workdir.")
_STEP = flags.DEFINE_integer("step", None, "Snapshot step of --checkpoint (default: latest).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A Hugging Face BailingMoeV2 checkpoint folder.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for a batch.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read the prompt from this file.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (or its folder).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 keeps all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass; 1 keeps all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_THINKING = flags.DEFINE_enum("thinking", "off", ["on", "off"], "DFT mode of Ling's chat format.")
_CHAT = flags.DEFINE_enum(
    "chat", "auto", ["auto", "on", "off"], "auto: chat format iff the tokenizer has a template."
)
_SYSTEM = flags.DEFINE_string("system", "", "System prompt (chat format).")
_STOP_IDS = flags.DEFINE_multi_integer("stop_id", [], "Extra stop token ids.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype; default float32 on CPU, else bf16.")
_ATTENTION = flags.DEFINE_enum("attention_impl", None, ["xla", "chunked"], "Prefill attention.")
_YARN = flags.DEFINE_float("yarn_factor", 0.0, "YaRN factor over the trained context; 0: off.")
_YARN_ORIGINAL = flags.DEFINE_integer(
    "yarn_original_max_position", None, "Trained context (default: max_position_embeddings)."
)
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile before timing.")


def _overrides(config) -> dict:
    out = {"mtp.num_layers": 0}  # Generation does not use the MTP layer; do not load it.
    if _ATTENTION.value:
        out["attention.impl"] = _ATTENTION.value
    if _YARN.value:
        out["rope.scaling.type"] = "yarn"
        out["rope.scaling.factor"] = _YARN.value
        out["rope.scaling.original_max_position_embeddings"] = (
            _YARN_ORIGINAL.value or config.max_position_embeddings
        )
        out["max_position_embeddings"] = int(
            _YARN.value * out["rope.scaling.original_max_position_embeddings"]
        )
    return out


def _set(config, dotted: str, value) -> None:
    *sections, name = dotted.split(".")
    for section in sections:
        config = config[section]
    config[name] = value


def _refuse_nonfinite(model: nnx.Module, source: str) -> None:
    bad = first_nonfinite_leaf(nnx.to_pure_dict(nnx.state(model)))
    if bad is not None:
        raise NonFiniteError(f"{source} holds NaN/inf weights (first: `{bad}`); refusing to load")


def _load_model():
    dtype = _DTYPE.value or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if bool(_CHECKPOINT.value) == bool(_HF_DIR.value):
        raise app.UsageError("give exactly one of --checkpoint and --hf_dir")
    if _HF_DIR.value:
        from ling_jax.convert.hf import load_pretrained, pretrained_config

        overrides = _overrides(pretrained_config(_HF_DIR.value))
        model = load_pretrained(_HF_DIR.value, dtype=dtype, config_overrides=overrides)
        _refuse_nonfinite(model, f"HF checkpoint {_HF_DIR.value}")
        return model, _TOKENIZER.value or paths.join(_HF_DIR.value, "tokenizer.json")
    if _CONFIG.value is not None:
        config = _CONFIG.value.model
    else:
        config, _ = snapshot_model_config(_CHECKPOINT.value, _STEP.value)
    for dotted, value in _overrides(config).items():
        _set(config, dotted, value)
    model, step = load_checkpoint(_CHECKPOINT.value, step=_STEP.value, config=config, dtype=dtype)
    _refuse_nonfinite(model, f"snapshot {step} of {_CHECKPOINT.value}")
    print(f"[restored step {step} of {_CHECKPOINT.value}]", flush=True)
    default_tokenizer = paths.join(_CHECKPOINT.value, "tokenizer", "tokenizer.json")
    return model, _TOKENIZER.value or default_tokenizer


def _prompts(tokenizer: Tokenizer, tokenizer_path: str) -> list[np.ndarray]:
    texts = list(_PROMPT.value)
    if _PROMPT_FILE.value:
        texts.append(paths.read_text(_PROMPT_FILE.value))
    if not texts:
        raise app.UsageError("give --prompt (or --prompt_file)")
    template = load_tokenizer_config(tokenizer_path).get("chat_template")
    chat = _CHAT.value == "on" or (_CHAT.value == "auto" and template is not None)
    if chat:
        rendered = []
        for text in texts:
            messages = [{"role": "user", "content": text}]
            if _SYSTEM.value:
                messages.insert(0, {"role": "system", "content": _SYSTEM.value})
            rendered.append(
                apply_chat_template(messages, template=template, thinking=_THINKING.value)
            )
        texts = rendered
    return [tokenizer.encode(text) for text in texts]


class _TextStream:
    """Prints the text of a growing token list as it grows (whole characters only)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # An incomplete UTF-8 sequence: wait for its other bytes.
            return
        sys.stdout.write(text[len(self.printed) :])
        sys.stdout.flush()
        self.printed = text


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax's restore chatter would bury the text.
    model, tokenizer_path = _load_model()
    if not paths.exists(tokenizer_path):
        raise app.UsageError(f"no tokenizer at {tokenizer_path}: pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_path, workdir=None)
    prompts = _prompts(tokenizer, tokenizer_path)
    stop = sorted(
        {tokenizer.eos_id, *generation_stop_ids(tokenizer_path), *_STOP_IDS.value}
        & set(range(model.config.vocab_size))
    )
    sampling = SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    generator = Generator(model, pad_id=tokenizer.pad_id)
    kwargs = dict(sampling=sampling, stop_tokens=stop, seed=_SEED.value)

    if _WARMUP.value:  # Same buckets, so the timed run below reuses the compiled programs.
        warm = generator.stream(prompts, _MAX_NEW.value, **kwargs)
        for _ in zip(range(2), warm, strict=False):
            pass
        warm.close()

    # One prompt prints its text as it comes; a batch prints each row at the end.
    live = _TextStream(tokenizer) if len(prompts) == 1 else None
    rows: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    first = last = None
    for step_tokens in generator.stream(prompts, _MAX_NEW.value, **kwargs):
        last = time.perf_counter()
        first = first or last
        for row, token in zip(rows, step_tokens.tolist(), strict=True):
            if token != NO_TOKEN:
                row.append(token)
                if live is not None and token not in stop:
                    live.add(token)
    if live is not None:
        print()
    else:
        for i, row in enumerate(rows):
            reason = "stop" if row and row[-1] in stop else "length"
            body = tokenizer.decode([t for t in row if t not in stop])
            print(f"--- [{i}] {len(row)} tokens ({reason})\n{body}")
    prompt_tokens = sum(len(p) for p in prompts)
    prefill_s = first - start
    decoded = sum(len(row) for row in rows) - len(rows)  # The first token comes from prefill.
    decode_s = last - first
    decode_rate = f"{decoded / decode_s:.1f}" if decoded and decode_s > 0 else "n/a"
    print(
        f"[prefill: {prompt_tokens} prompt tokens in {prefill_s * 1e3:.1f} ms = "
        f"{prompt_tokens / prefill_s:.1f} tokens/s | decode: {decoded} tokens in "
        f"{decode_s * 1e3:.1f} ms = {decode_rate} tokens/s (batch {len(prompts)})]"
    )


if __name__ == "__main__":
    app.run(main)
