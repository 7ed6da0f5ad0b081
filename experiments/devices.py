"""Devices: multi-host start-up, the CPU device count, the data-parallel mesh, replication."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

# Let `python experiments/<script>.py` find jxent in a plain checkout; an installed jxent wins.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))


def initialize_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Joins a multi-host JAX job (``jax.distributed.initialize``); ``None`` = auto-detect.

    On SLURM, Open MPI, Kubernetes and Cloud TPU every argument can be left ``None``.
    """

    # Only the CPU backend reads this: cross-process CPU collectives (a CPU-only test cluster).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def set_cpu_device_count(devices: int) -> None:
    """Asks JAX for ``devices`` host (CPU) devices; must run before JAX's first operation."""

    if devices <= 1:
        return
    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError as err:  # backend already initialised
        raise RuntimeError(
            f"--devices {devices}: JAX's CPU backend was initialised before the device count "
            f"could be set ({err}); set it at program start"
        ) from None


def make_mesh(devices: int, batch_size: int | None = None) -> Any:
    """A 1-D ``Mesh`` named ``data`` over the first ``devices`` devices.

    ``batch_size``, if given, must split evenly over them.
    """

    available = jax.devices()
    if devices < 1 or devices > len(available):
        raise ValueError(
            f"--devices {devices}: expected 1..{len(available)} (JAX sees {available}); on CPU "
            "the count is set with jax_num_cpu_devices before JAX starts"
        )
    if batch_size is not None and batch_size % devices:
        raise ValueError(f"batch size {batch_size} must be divisible by --devices {devices}")
    return jax.sharding.Mesh(np.array(available[:devices]), ("data",))


def replicate(tree: Any, sharding: Any) -> Any:
    """Host values -> global arrays replicated over ``sharding``'s mesh.

    ``make_array_from_callback`` also works when the mesh spans several processes (each process
    passes the same host values and fills its own devices), unlike a plain ``device_put``.
    """

    def one(value: Any) -> Any:
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)
