"""Several hosts: start JAX's distributed runtime when the launcher says so.

On a cluster, set on every host (or let the launcher set them; SLURM, Open MPI and Cloud TPU
are detected by JAX itself when JAX_DISTRIBUTED=auto):
    JAX_COORDINATOR_ADDRESS=host0:1234  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
then run the same command on every host. The trainer builds its `data` mesh over all devices of
all hosts, and each host feeds only the rows of each global batch that its devices hold.
"""
import os

import jax

_initialized = False


def initialize_from_env() -> bool:
    """jax.distributed.initialize() when the environment asks for it; True if it did."""
    global _initialized
    if _initialized:
        return True
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        # Must run before anything touches a backend. CPU collectives default to gloo.
        jax.distributed.initialize(coordinator_address=address,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()  # SLURM / Open MPI / Cloud TPU environments
    else:
        return False
    _initialized = True
    return True


def is_primary() -> bool:
    return jax.process_index() == 0
