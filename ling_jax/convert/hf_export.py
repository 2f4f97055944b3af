"""Exports an `experiments.run` snapshot as a Hugging Face folder that transformers can load.

The folder holds the weights and config.json (`hf.save_pretrained`) plus the run's tokenizer as
transformers expects it: tokenizer.json, tokenizer_config.json (`PreTrainedTokenizerFast` with
the EOS and padding tokens), special_tokens_map.json and generation_config.json; config.json
gains `eos_token_id` and `pad_token_id`.

transformers has no BailingMoeV2 class of its own (5.25 ships `bailing_hybrid`, Ling 3.0's MLA
and linear-attention hybrid, a different architecture), so config.json carries no `auto_map` by
default: `AutoTokenizer` and `PretrainedConfig` load the folder, `AutoConfig` and
`AutoModelForCausalLM` need the remote code. `remote_code=DIR` copies the two files of
inclusionAI/Ling-V2 `models/` (also shipped with every released checkpoint) from DIR into the
folder and adds the `auto_map` that points at them (`trust_remote_code=True` then loads it;
the model class needs torch).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ling_jax.convert.hf import save_pretrained
from ling_jax.convert.hf_io import CONFIG_FILE, prepare_output
from ling_jax.data.tokenizer import Tokenizer, check_vocab, load_tokenizer
from ling_jax.infer.loading import load_checkpoint
from ling_jax.io import paths

# The remote-code files of the released checkpoints and the auto_map entries naming them.
REMOTE_CODE_FILES = ("configuration_bailing_moe_v2.py", "modeling_bailing_moe_v2.py")
AUTO_MAP = {
    "AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
    "AutoModel": "modeling_bailing_moe_v2.BailingMoeV2Model",
    "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
_RUN_TOKENIZER = os.path.join("tokenizer", "tokenizer.json")  # where experiments.run caches it


def _read_json(path: str) -> dict[str, Any]:
    if not paths.exists(path):
        return {}
    return json.loads(paths.read_text(path))


def _token(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.hf.id_to_token(token_id)


def save_hf_tokenizer(
    tokenizer: Tokenizer, source: str, path: str | os.PathLike, model_max_length: int
) -> None:
    """Writes `tokenizer` (loaded from the tokenizer.json `source`) into the HF folder `path`.

    A tokenizer_config.json beside `source` (e.g. Ling's, with its chat template) is kept and
    completed; the EOS and padding tokens are the ones the run trained with.
    """
    path = Path(path)
    tokenizer.hf.save(str(path / "tokenizer.json"))
    folder = paths.dirname(source)
    eos, pad = _token(tokenizer, tokenizer.eos_id), _token(tokenizer, tokenizer.pad_id)
    config = _read_json(paths.join(folder, "tokenizer_config.json"))
    for key in ("auto_map", "tokenizer_file"):  # They would point outside this folder.
        config.pop(key, None)
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        eos_token=eos,
        pad_token=pad,
        model_max_length=model_max_length,
    )
    config.setdefault("bos_token", None)
    config.setdefault("clean_up_tokenization_spaces", False)
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = _read_json(paths.join(folder, "special_tokens_map.json"))
    special.update(eos_token=eos, pad_token=pad)
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    generation = _read_json(paths.join(folder, "generation_config.json"))
    generation.setdefault("eos_token_id", tokenizer.eos_id)
    generation["pad_token_id"] = tokenizer.pad_id
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _check_remote_code(remote_code: str) -> None:
    missing = [f for f in REMOTE_CODE_FILES if not os.path.isfile(os.path.join(remote_code, f))]
    if missing:
        raise FileNotFoundError(
            f"remote_code = {remote_code!r} lacks {missing}: give a folder holding "
            f"{list(REMOTE_CODE_FILES)} (inclusionAI/Ling-V2 models/, or a released checkpoint)"
        )


def add_remote_code(path: str | os.PathLike, remote_code: str) -> None:
    """Copies the BailingMoeV2 remote-code files from `remote_code` into `path` and adds the
    `auto_map` naming them to its config.json."""
    _check_remote_code(remote_code)
    path = Path(path)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(remote_code, name), path / name)
    config = json.loads((path / CONFIG_FILE).read_text())
    config["auto_map"] = dict(AUTO_MAP)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def export_workdir(
    workdir: str,
    output: str | os.PathLike,
    *,
    step: int | None = None,
    tokenizer: str = "",
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    fp8: bool = False,
    remote_code: str = "",
) -> int:
    """Writes snapshot `step` (default: the latest) of run `workdir` and its tokenizer as an HF
    folder; returns the step. `tokenizer` defaults to the BPE the run cached in
    `<workdir>/tokenizer/` (a run trained on a given tokenizer.json must name it); `dtype` casts
    the weights (None keeps the stored dtype). A gs:// `output` is written locally, then
    uploaded."""
    if paths.is_remote(os.fspath(output)):
        prepare_output(output, overwrite)
        with paths.staged_folder(os.fspath(output)) as staging:
            return export_workdir(
                workdir,
                staging,
                step=step,
                tokenizer=tokenizer,
                dtype=dtype,
                max_shard_bytes=max_shard_bytes,
                overwrite=overwrite,
                fp8=fp8,
                remote_code=remote_code,
            )
    source = tokenizer or paths.join(workdir, _RUN_TOKENIZER)
    if paths.isdir(source):
        source = paths.join(source, "tokenizer.json")
    if not paths.isfile(source):
        raise FileNotFoundError(
            f"no tokenizer at {source}: the run did not train one in its workdir; pass the "
            "tokenizer.json it trained with (--tokenizer)"
        )
    if remote_code:
        _check_remote_code(remote_code)
    tok = load_tokenizer(source, workdir=None)
    model, step = load_checkpoint(workdir, step=step)  # Loaded before anything is written.
    check_vocab(tok, model.config.vocab_size)
    save_pretrained(model, output, max_shard_bytes, dtype, overwrite, fp8)
    save_hf_tokenizer(tok, source, output, model.config.max_position_embeddings)
    config_path = Path(output) / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config.update(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if remote_code:
        add_remote_code(output, remote_code)
    return step
