"""Tests for the HF safetensors import/export (SPEC section 3) and the config.json mapping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ling_jax.configs import get_preset
from ling_jax.convert import hf
from ling_jax.model import LingForCausalLM

D, V, HEAD, N_H, N_KV, E = 64, 256, 16, 4, 2, 16  # the tiny preset


def random_model(cfg, seed: int = 0) -> LingForCausalLM:
    """A model with distinct random values everywhere, built without compiling its init."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    leaves = []
    for path, variable in nnx.to_flat_state(abstract):
        spec = variable.get_value()
        if path[-1] == "scale":
            value = 1.0 + 0.2 * rng.standard_normal(spec.shape)
        else:
            value = 0.1 * rng.standard_normal(spec.shape)
        value = jnp.asarray(value.astype(spec.dtype))
        leaves.append((path, variable.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def flat(model) -> dict[tuple, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_state(a, b) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        assert fa[path].shape == fb[path].shape, path
        assert fa[path].tobytes() == fb[path].tobytes(), path  # bit-exact


@nnx.jit
def forward(model, input_ids):
    out = model(input_ids)
    return out.logits, out.mtp_logits


def tiny(preset: str = "tiny", dtype: str = "float32", **moe):
    cfg = get_preset(preset)
    cfg.param_dtype = cfg.dtype = dtype
    cfg.moe.update(moe)
    return cfg


@pytest.fixture(scope="module")
def models():
    """Random tiny models keyed by (preset, dtype), built once for the module."""
    return {
        (preset, dtype): random_model(tiny(preset, dtype), seed=len(preset))
        for preset in ("tiny", "tiny_no_mtp")
        for dtype in ("float32", "bfloat16")
    }


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory) -> Path:
    """The fp32 tiny model (with MTP) saved once, single shard."""
    path = tmp_path_factory.mktemp("hf") / "tiny"
    hf.save_pretrained(models["tiny", "float32"], path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["tiny", "tiny_no_mtp"])
def test_roundtrip_bit_exact_state_and_logits(models, tmp_path, preset, dtype):
    model = models[preset, dtype]
    hf.save_pretrained(model, tmp_path)
    loaded = hf.load_pretrained(tmp_path)
    assert loaded.config == model.config
    assert (loaded.mtp is None) == (preset == "tiny_no_mtp")
    assert_same_state(model, loaded)
    bias = nnx.state(loaded)["moe_layers"]["blocks"]["ffn"]["router"]["expert_bias"]
    assert bias.get_value().dtype == jnp.float32
    input_ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 37 % V
    for want, got in zip(forward(model, input_ids), forward(loaded, input_ids), strict=True):
        assert (want is None) == (got is None)
        if want is not None:
            np.testing.assert_array_equal(np.asarray(want), np.asarray(got))


def expected_tensors() -> dict[str, tuple[int, ...]]:
    """Every tensor of a tiny checkpoint, spelled out as SPEC section 3 lists them."""
    qkv = ((N_H + 2 * N_KV) * HEAD, D)
    shapes = {"model.word_embeddings.weight": (V, D), "model.norm.weight": (D,)}
    shapes["lm_head.weight"] = (V, D)
    for layer in range(4):  # 0 dense, 1-2 MoE, 3 the MTP layer
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (D,),
            p + "attention.query_key_value.weight": qkv,
            p + "attention.query_layernorm.weight": (HEAD,),
            p + "attention.key_layernorm.weight": (HEAD,),
            p + "attention.dense.weight": (D, N_H * HEAD),
            p + "post_attention_layernorm.weight": (D,),
        }
        if layer == 0:
            shapes |= {
                p + "mlp.gate_proj.weight": (128, D),
                p + "mlp.up_proj.weight": (128, D),
                p + "mlp.down_proj.weight": (D, 128),
            }
            continue
        shapes |= {p + "mlp.gate.weight": (E, D), p + "mlp.gate.expert_bias": (E,)}
        for e in range(E):
            shapes |= {
                p + f"mlp.experts.{e}.gate_proj.weight": (32, D),
                p + f"mlp.experts.{e}.up_proj.weight": (32, D),
                p + f"mlp.experts.{e}.down_proj.weight": (D, 32),
            }
        shapes |= {
            p + "mlp.shared_experts.gate_proj.weight": (32, D),
            p + "mlp.shared_experts.up_proj.weight": (32, D),
            p + "mlp.shared_experts.down_proj.weight": (D, 32),
        }
    shapes |= {
        "model.layers.3.enorm.weight": (D,),
        "model.layers.3.hnorm.weight": (D,),
        "model.layers.3.eh_proj.weight": (D, 2 * D),
        "model.layers.3.final_layernorm.weight": (D,),
    }
    return shapes


def read_all(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (tensor, safetensors dtype) over every shard of the index."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(path / file, framework="numpy") as f:
            names = f.keys()
            for name in names:
                assert index["weight_map"][name] == file
                out[name] = (f.get_tensor(name), f.get_slice(name).get_dtype())
    return out


def test_names_shapes_dtypes_and_orientation(models, tmp_path):
    model = models["tiny", "bfloat16"]
    hf.save_pretrained(model, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    expected = expected_tensors()
    assert set(index["weight_map"]) == set(expected)
    tensors = read_all(tmp_path)
    assert {name: t.shape for name, (t, _) in tensors.items()} == expected
    for name, (_, dtype) in tensors.items():
        assert dtype == ("F32" if name.endswith("expert_bias") else "BF16"), name
    assert index["metadata"]["total_size"] == sum(t.nbytes for t, _ in tensors.values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config["architectures"] == ["BailingMoeV2ForCausalLM"]

    # HF [out, in] orientation; HF layer 2 is MoE stack index 1, layer 3 is the MTP layer.
    state = flat(model)
    moe = ("moe_layers", "blocks")
    qkv = state[moe + ("attention", "qkv")][1]  # [d, n_h + 2 n_kv, head_dim]
    fused = tensors["model.layers.2.attention.query_key_value.weight"][0]
    np.testing.assert_array_equal(fused[: N_H * HEAD], qkv[:, :N_H].reshape(D, -1).T)
    np.testing.assert_array_equal(
        fused[N_H * HEAD :][: N_KV * HEAD], qkv[:, N_H:-N_KV].reshape(D, -1).T
    )
    np.testing.assert_array_equal(fused[-N_KV * HEAD :], qkv[:, -N_KV:].reshape(D, -1).T)
    out = state[moe + ("attention", "out")][1]  # [n_h, head_dim, d]
    dense = tensors["model.layers.2.attention.dense.weight"][0]
    np.testing.assert_array_equal(dense, out.reshape(-1, D).T)
    gate = state[moe + ("ffn", "experts", "gate")][1, 5]  # [d, d_e]
    np.testing.assert_array_equal(
        tensors["model.layers.2.mlp.experts.5.gate_proj.weight"][0], gate.T
    )
    router = state[moe + ("ffn", "router", "kernel")][0]
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.gate.weight"][0], router.T)
    np.testing.assert_array_equal(
        tensors["model.layers.3.mlp.gate.expert_bias"][0],
        state["mtp", "block", "ffn", "router", "expert_bias"],
    )
    np.testing.assert_array_equal(
        tensors["model.layers.3.eh_proj.weight"][0], state["mtp", "eh_proj"].T
    )
    np.testing.assert_array_equal(tensors["lm_head.weight"][0], state["lm_head",].T)

    # The generator also takes a plain nested dict of arrays (e.g. a restored checkpoint).
    pure = nnx.to_pure_dict(nnx.state(model))
    names = [name for name, _ in hf.hf_tensors_from_state(pure, model.config)]
    assert set(names) == set(expected)


def test_sharded_save_loads_back(models, tmp_path):
    model = models["tiny_no_mtp", "float32"]
    hf.save_pretrained(model, tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3
    assert files == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, 1 + len(files))
    ]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == files
    assert_same_state(model, hf.load_pretrained(tmp_path))


def test_dtype_cast_on_save_and_load(models, tmp_path):
    model = models["tiny", "float32"]
    hf.save_pretrained(model, tmp_path, dtype="bfloat16")
    loaded = hf.load_pretrained(tmp_path, dtype="float32")
    for path, want in flat(model).items():
        got = flat(loaded)[path]
        assert got.dtype == np.float32
        cast = want if "expert_bias" in path else want.astype(jnp.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(got, cast)


def test_without_expert_bias_writes_zero_buffers(tmp_path):
    model = random_model(tiny("tiny_no_mtp", use_expert_bias=False))
    hf.save_pretrained(model, tmp_path)
    tensors = read_all(tmp_path)
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.gate.expert_bias"][0], np.zeros(E))
    assert_same_state(model, hf.load_pretrained(tmp_path))


def test_mtp_layer_can_be_dropped(models, saved):
    loaded = hf.load_pretrained(saved, config_overrides={"mtp.num_layers": 0})
    assert loaded.mtp is None
    want = flat(models["tiny", "float32"])
    got = flat(loaded)
    assert got.keys() == {p for p in want if p[0] != "mtp"}
    for path, value in got.items():
        np.testing.assert_array_equal(value, want[path])


def edited_copy(saved: Path, tmp_path: Path, edit) -> Path:
    """A single-file copy of `saved` with `edit(tensors)` applied (no index file)."""
    tensors = {name: t for name, (t, _) in read_all(saved).items()}
    edit(tensors)
    path = tmp_path / "edited"
    path.mkdir()
    shutil.copy(saved / "config.json", path / "config.json")
    save_file(tensors, path / "model.safetensors")
    return path


def test_single_file_checkpoint_loads(saved, tmp_path, models):
    path = edited_copy(saved, tmp_path, lambda tensors: None)
    assert_same_state(models["tiny", "float32"], hf.load_pretrained(path))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.update({"model.layers.0.attention.dense.bias": np.zeros(D, np.float32)}),
            "model.layers.0.attention.dense.bias",
        ),
        (
            lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
            "model.layers.1.mlp.experts.3.up_proj.weight",
        ),
        (
            lambda t: t.update(
                {"model.layers.2.mlp.gate.weight": np.zeros((E, D - 1), np.float32)}
            ),
            r"'model.layers.2.mlp.gate.weight' has shape \(16, 63\), expected \(16, 64\)",
        ),
    ],
    ids=["unknown", "missing", "shape"],
)
def test_tensor_errors_name_the_tensor(saved, tmp_path, edit, message):
    path = edited_copy(saved, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        hf.load_pretrained(path)


def test_missing_mtp_tensors_hint(saved, tmp_path):
    def drop_mtp(tensors):
        for name in [n for n in tensors if n.startswith("model.layers.3.")]:
            del tensors[name]

    path = edited_copy(saved, tmp_path, drop_mtp)
    with pytest.raises(ValueError, match=r"model\.layers\.3\..*mtp\.num_layers': 0"):
        hf.load_pretrained(path)


def test_file_errors_name_the_file(saved, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(saved, path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(path)
    shutil.copy(saved / "config.json", path / "config.json")
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        hf.load_pretrained(path)
    index = {"weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009.safetensors"):
        hf.load_pretrained(path)
    (path / "config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="config.json"):
        hf.load_pretrained(path)


def test_output_directory_rules(models, tmp_path):
    model = models["tiny_no_mtp", "float32"]
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hf.save_pretrained(model, tmp_path)
    hf.save_pretrained(model, tmp_path, max_shard_bytes=300_000, overwrite=True)
    hf.save_pretrained(model, tmp_path, overwrite=True)  # one shard now: old shards go
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]


def test_cli_inspect_and_roundtrip(saved, tmp_path, capsys):
    assert hf.main(["inspect", f"--hf_dir={saved}"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert hf.main(["roundtrip", f"--hf_dir={saved}", f"--output={tmp_path}"]) == 0
    assert read_all(tmp_path).keys() == read_all(saved).keys()
    for name, (tensor, _) in read_all(tmp_path).items():
        assert tensor.tobytes() == read_all(saved)[name][0].tobytes(), name


def yarn(cfg, mscale=None):
    cfg.max_position_embeddings = 131072
    cfg.rope.scaling.type = "yarn"
    cfg.rope.scaling.factor = 4.0
    cfg.rope.scaling.original_max_position_embeddings = 32768
    cfg.rope.scaling.mscale = mscale
    return cfg


@pytest.mark.parametrize(
    "make",
    [
        lambda: get_preset("ling_mini_2"),
        lambda: get_preset("ling_flash_2"),
        lambda: get_preset("ling_1t"),
        lambda: yarn(get_preset("ling_mini_2")),
        lambda: yarn(get_preset("ling_1t"), mscale=1.25),
    ],
    ids=["mini", "flash", "1t", "mini-yarn", "1t-yarn-mscale"],
)
def test_config_roundtrip(make):
    cfg = make()
    hf_config = hf.config_to_hf(cfg)
    assert json.loads(json.dumps(hf_config)) == hf_config
    assert hf.config_from_hf(hf_config) == cfg


def test_config_to_hf_values():
    got = hf.config_to_hf(get_preset("ling_1t"))
    want = {
        "architectures": ["BailingMoeV2ForCausalLM"],
        "model_type": "bailing_moe",
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "moe_shared_expert_intermediate_size": 2048,
        "num_experts": 256,
        "num_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "score_function": "sigmoid",
        "norm_topk_prob": True,
        "moe_router_enable_expert_bias": True,
        "first_k_dense_replace": 4,
        "partial_rotary_factor": 0.5,
        "rope_theta": 600000.0,
        "rope_scaling": None,
        "vocab_size": 157184,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_qk_norm": True,
        "use_bias": False,
        "use_qkv_bias": False,
        "use_rmsnorm": True,
        "hidden_act": "silu",
        "num_nextn_predict_layers": 1,
    }
    assert {key: got[key] for key in want} == want


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_bias", True),
        ("use_qkv_bias", True),
        ("tie_word_embeddings", True),
        ("hidden_act", "gelu"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("score_function", "relu"),
        ("num_nextn_predict_layers", 2),
        ("num_key_value_heads", 3),
        ("hidden_size", "2048"),
    ],
)
def test_config_from_hf_errors_name_the_key(key, value):
    hf_config = hf.config_to_hf(get_preset("ling_mini_2"))
    hf_config[key] = value
    with pytest.raises(ValueError, match=key):
        hf.config_from_hf(hf_config)


def test_config_from_hf_requires_sizes():
    hf_config = hf.config_to_hf(get_preset("ling_mini_2"))
    del hf_config["num_experts"]
    with pytest.raises(ValueError, match="num_experts"):
        hf.config_from_hf(hf_config)


def test_config_from_released_style_json():
    """A config.json shaped like the released Ling-mini-2.0 one (extra keys are ignored)."""
    released = {
        "architectures": ["BailingMoeV2ForCausalLM"],
        "model_type": "bailing_moe",
        "auto_map": {"AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config"},
        "hidden_size": 2048,
        "intermediate_size": 5120,
        "num_hidden_layers": 20,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "moe_intermediate_size": 512,
        "moe_shared_expert_intermediate_size": 512,
        "num_experts": 256,
        "num_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "score_function": "sigmoid",
        "norm_topk_prob": True,
        "moe_router_enable_expert_bias": True,
        "router_dtype": "fp32",
        "partial_rotary_factor": 0.5,
        "rotary_dim": 64,
        "rope_theta": 600000,
        "rope_scaling": None,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "use_bias": False,
        "use_qkv_bias": False,
        "use_qk_norm": True,
        "use_rmsnorm": True,
        "num_nextn_predict_layers": 0,
        "mtp_loss_scaling_factor": 0,
        "vocab_size": 157184,
        "torch_dtype": "bfloat16",
        "eos_token_id": 156892,
        "pad_token_id": 156892,
        "use_cache": True,
        "transformers_version": "4.52.3",
    }
    want = get_preset("ling_mini_2")
    want.param_dtype = "bfloat16"
    want.mtp.num_layers = 0
    want.mtp.loss_weight = 0.0
    assert hf.config_from_hf(released) == want
