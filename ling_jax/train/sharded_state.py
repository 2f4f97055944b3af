"""A `TrainState` created directly in its sharded layout on a mesh.

Parameter shardings come from each parameter's logical axes (`ling_jax.parallel.rules`), the
optimizer moments follow their parameters, and everything small (step, counts, expert biases)
is replicated. The state is initialised inside `jit` with these output shardings, so no host or
device ever holds the whole model: the same path serves a CPU test and a 1T run on a pod.
"""

from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from ling_jax.model import LingForCausalLM
from ling_jax.model.params import ExpertBias
from ling_jax.parallel.sharding import replicated, variable_shardings
from ling_jax.train.train_step import TrainState, init_train_state


def abstract_train_state(
    model_config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation
) -> TrainState:
    """The TrainState's shapes and dtypes; nothing is allocated (a 1T model on a laptop)."""
    return jax.eval_shape(
        lambda: init_train_state(LingForCausalLM(model_config, rngs=nnx.Rngs(0)), optimizer)[1]
    )


def train_state_shardings(
    model_config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation, mesh: Mesh
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, abstract TrainState, TrainState of NamedShardings) for a model config."""
    abstract_model = nnx.eval_shape(lambda: LingForCausalLM(model_config, rngs=nnx.Rngs(0)))
    param_shardings = variable_shardings(nnx.state(abstract_model, nnx.Param), mesh)
    bias_shardings = variable_shardings(nnx.state(abstract_model, ExpertBias), mesh)
    graphdef = nnx.graphdef(abstract_model)
    abstract_state = abstract_train_state(model_config, optimizer)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )
    shardings = TrainState(
        step=replicated(mesh),
        params=param_shardings,
        expert_bias=bias_shardings,
        opt_state=opt_shardings,
    )
    return graphdef, abstract_state, shardings


def init_sharded_train_state(
    model_config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    seed: int,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, state, shardings): a freshly initialised state, laid out on `mesh`."""
    graphdef, _, shardings = train_state_shardings(model_config, optimizer, mesh)

    def init() -> TrainState:
        model = LingForCausalLM(model_config, rngs=nnx.Rngs(seed))
        return init_train_state(model, optimizer)[1]

    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings
