"""A tiny randomised Ling model shared by the inference tests (built once per session)."""

from __future__ import annotations

import pytest
from flax import nnx

from ling_jax.configs import get_preset
from ling_jax.model import LingForCausalLM
from tests.model.conftest import randomize


def tiny_infer_model(**overrides) -> LingForCausalLM:
    """`tiny` (fp32, MTP layer present but unused by generation) with random parameters;
    `overrides` maps dotted config fields to values."""
    cfg = get_preset("tiny")
    for dotted, value in overrides.items():
        *sections, name = dotted.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        node[name] = value
    # Every variable gets a random value below, so the (slow to compile) init is skipped.
    model = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    randomize(model)
    return model


@pytest.fixture(scope="session")
def infer_model() -> LingForCausalLM:
    return tiny_infer_model()
