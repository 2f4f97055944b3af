"""The shipped experiment configs are valid, and the recipes carry the paper's numbers."""

from __future__ import annotations

import math

import pytest

from experiments.configs import ling_1t, ling_flash_2, ling_mini_2, quickstart, smoke
from ling_jax.model import count_params
from ling_jax.parallel.mesh import BATCH_AXES, MESH_AXES, mesh_shape
from ling_jax.parallel.topology import parse_topology
from ling_jax.train.experiment import validate_experiment_config

TABLE_1 = {ling_mini_2: (3.36e-4, 4400), ling_flash_2: (2.61e-4, 8352), ling_1t: (1.86e-4, 18144)}


@pytest.mark.parametrize("module", [quickstart, smoke])
def test_cpu_configs_validate(module):
    validate_experiment_config(module.get_config())


@pytest.mark.parametrize("module", sorted(TABLE_1, key=lambda m: m.__name__))
def test_pretraining_recipes(module):
    cfg = module.get_config()
    with pytest.raises(ValueError, match="data.train_files"):
        validate_experiment_config(cfg)
    cfg.data.train_files = "/data/*.arrayrecord"
    validate_experiment_config(cfg)
    assert (cfg.optim.peak_lr, cfg.train.batch_size) == TABLE_1[module]
    assert cfg.schedule.type == "wsm" and cfg.schedule.warmup_steps == 2000
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (
        0.9,
        0.95,
        0.1,
        1.0,
    )
    assert cfg.model.init_std == 0.006 and cfg.model.mtp.loss_weight == 0.1
    assert cfg.optim.bias_update_rate == 1e-3 and cfg.data.seq_len == 4096
    assert (cfg.mesh.ici.fsdp, cfg.mesh.ici.data, cfg.mesh.dcn.data) == (-1, 1, -1)


def test_quickstart_has_every_ling_feature():
    model = quickstart.get_config().model
    assert model.moe.num_shared_experts == 1 and model.moe.score_function == "sigmoid"
    assert model.moe.use_expert_bias and model.moe.topk_group < model.moe.n_group
    assert model.attention.use_qk_norm and model.rope.partial_rotary_factor == 0.5
    assert model.mtp.num_layers == 1 and 0 < model.first_k_dense_replace < model.num_layers


@pytest.mark.parametrize("module", sorted(TABLE_1, key=lambda m: m.__name__))
def test_verified_tpu_shapes_are_consistent(module):
    """The topology, batch and overrides each recipe names as verified by experiments.aot (no
    compile here): the mesh resolves over the chips, the batch splits over the batch axes and
    the experts over `expert`, and fp32 parameters plus Adam state fit in the chips' HBM."""
    chip, _, chips = parse_topology(module.VERIFIED_TOPOLOGY)
    cfg = module.get_config("aot")
    assert cfg.aot.topology == module.VERIFIED_TOPOLOGY
    assert cfg.train.batch_size == module.VERIFIED_BATCH
    for key, value in module.VERIFIED_OVERRIDES.items():
        assert key.startswith(("mesh.", "model.attention.")), key  # numerics stay the recipe's
        section, *rest = key.split(".")
        node = cfg[section]
        for name in rest[:-1]:
            node = node[name]
        assert node[rest[-1]] == value
    ici, dcn = mesh_shape(cfg.mesh, chips)
    sizes = dict(zip(MESH_AXES, ici, strict=True))
    assert math.prod(dcn) == 1
    assert cfg.train.batch_size % math.prod(sizes[axis] for axis in BATCH_AXES) == 0
    assert cfg.train.batch_size % cfg.train.micro_batches == 0
    assert cfg.model.moe.num_experts % sizes["expert"] == 0
    state_bytes = 12 * count_params(cfg.model).total  # fp32 master weights, Adam mu and nu
    assert state_bytes < chips * chip.hbm_bytes
    # Everything else is the recipe's.
    recipe = module.get_config()
    assert cfg.optim.to_dict() == recipe.optim.to_dict()
    assert cfg.model.moe.to_dict() == recipe.model.moe.to_dict()
    cfg.data.train_files = "/data/*.arrayrecord"
    validate_experiment_config(cfg)
    with pytest.raises(ValueError, match="variant"):
        module.get_config("nonsense")
