"""Exporting a run's snapshot and tokenizer as an HF folder, checked with transformers.

transformers runs here without torch: its config and tokenizer classes load the folder, the
weights are read back with safetensors' numpy API. It has no BailingMoeV2 model class (and
the remote-code one needs torch), so no logits are compared through it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers
from flax import nnx
from safetensors import safe_open

from ling_jax.convert import hf, hf_export
from ling_jax.convert.hf_layout import hf_tensors_from_state
from ling_jax.data.tokenizer import load_tokenizer
from ling_jax.infer import load_checkpoint
from tests.convert.test_hf import assert_same_state
from tests.infer.run_dir import CORPUS, STEP, make_run_dir

SAMPLE = "def add(a, b):\n    return [x * x for x in (a, b)]  # héllo wörld <|endoftext|>"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run directory and its latest snapshot exported by the command line."""
    workdir = str(tmp_path_factory.mktemp("run"))
    make_run_dir(workdir)
    out = str(tmp_path_factory.mktemp("hf") / "export")
    assert hf.main(["export", f"--workdir={workdir}", f"--output={out}"]) == 0
    return workdir, out


def test_folder_holds_what_its_config_names(exported):
    _, out = exported
    config = json.loads(Path(out, "config.json").read_text())
    assert "auto_map" not in config  # No remote code in the folder, so none is named.
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
        + list(hf_export.TOKENIZER_FILES)
    )
    loaded = transformers.PretrainedConfig.from_pretrained(out)
    assert loaded.model_type == "bailing_moe"
    assert loaded.architectures == ["BailingMoeV2ForCausalLM"]
    assert (loaded.hidden_size, loaded.vocab_size, loaded.eos_token_id) == (64, 320, 0)
    # transformers has no class for this model type: AutoConfig needs the remote code.
    with pytest.raises(ValueError, match="bailing_moe"):
        transformers.AutoConfig.from_pretrained(out)


def test_tokenizer_loads_with_transformers_and_gives_our_ids(exported):
    workdir, out = exported
    ours = load_tokenizer(os.path.join(workdir, "tokenizer", "tokenizer.json"), workdir=None)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in [SAMPLE, *CORPUS]:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text).tolist()
        assert theirs.decode(ids) == ours.decode(ids) == text
    assert theirs.encode("a b") == ours.encode("a b").tolist()  # Adds no special token.
    assert (theirs.eos_token, theirs.eos_token_id) == ("<|endoftext|>", ours.eos_id)
    assert theirs.pad_token_id == ours.pad_id
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == ours.eos_id


def test_weights_read_back_identical(exported):
    workdir, out = exported
    model, step = load_checkpoint(workdir)
    assert step == STEP
    want = dict(hf_tensors_from_state(nnx.state(model), model.config))
    got = {}
    with safe_open(os.path.join(out, "model-00001-of-00001.safetensors"), framework="np") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            got[name] = f.get_tensor(name)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
    assert_same_state(hf.load_pretrained(out), model)  # Our import gives the same parameters.


def test_remote_code_is_copied_and_named(exported, tmp_path):
    _, out = exported
    code = tmp_path / "code"
    code.mkdir()
    # Stand-ins for inclusionAI/Ling-V2's files (the real modeling file needs torch).
    (code / "configuration_bailing_moe_v2.py").write_text(
        "from transformers import PretrainedConfig\n"
        "class BailingMoeV2Config(PretrainedConfig):\n"
        "    model_type = 'bailing_moe'\n"
    )
    (code / "modeling_bailing_moe_v2.py").write_text("")
    folder = tmp_path / "with_code"
    shutil.copytree(out, folder)
    hf_export.add_remote_code(folder, str(code))
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "BailingMoeV2Config" and config.hidden_size == 64


def test_export_errors_write_nothing(exported, tmp_path):
    workdir, _ = exported
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"has no snapshot 3; it has \[7\]"):
        hf_export.export_workdir(workdir, out, step=3)
    with pytest.raises(FileNotFoundError, match="lacks"):
        hf_export.export_workdir(workdir, out, remote_code=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pass the tokenizer.json"):
        hf_export.export_workdir(str(tmp_path), out)
    assert not out.exists()
