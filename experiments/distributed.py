"""Joining the other processes of a multi-process job (`experiments.run`, `experiments.merge`).

Importing this module defines the flags --coordinator_address, --num_processes and --process_id
(once, however many entry points import it); `initialize_distributed()` reads them.
"""

from __future__ import annotations

import os

import jax
from absl import flags

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs off TPU pods."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the run.")


def initialize_distributed() -> None:
    """Joins the other processes of the job, if there are any.

    On a multi-host TPU slice or multislice, JAX finds its peers from the TPU environment; on
    other machines (e.g. several CPU processes on localhost) pass the three flags above.
    """
    if _COORDINATOR.value is not None:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
        return
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
