"""Devices: multi-host start-up, the CPU device count, the data-parallel mesh, replication."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def initialize_distributed(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    join_timeout: int = 300,
    heartbeat_timeout: int = 100,
) -> None:
    """Joins a multi-process JAX job (``jax.distributed.initialize``); ``None`` = auto-detect.

    On SLURM, Open MPI, Kubernetes and Cloud TPU every argument can be left ``None``. Every
    process waits at most ``join_timeout`` seconds for all to join (and, at exit, for all to
    finish); a process silent for ``heartbeat_timeout`` seconds counts as dead, and jax then
    terminates the others with an error naming it.
    """
    for flag, value in (
        ("--join-timeout", join_timeout),
        ("--heartbeat-timeout", heartbeat_timeout),
    ):
        if value < 1:
            raise SystemExit(f"{flag} {value}: expected a whole number of seconds >= 1")
    # Only the CPU backend reads this: cross-process CPU collectives (a CPU-only test cluster).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = f"process {process_id} of {num_processes} (--coordinator {coordinator})"
    # jax gives up on a missing process by aborting in C++ with a message about a dead task;
    # this watchdog says first what went wrong. jax's own bound, a little later, is the backstop.
    joined = threading.Event()
    watchdog = threading.Thread(
        target=_exit_unless_joined,
        args=(joined, join_timeout, where, num_processes),
        daemon=True,
    )
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=join_timeout + JOIN_BACKSTOP_S,
            heartbeat_timeout_seconds=heartbeat_timeout,
            shutdown_timeout_seconds=join_timeout,
        )
    except Exception as err:  # e.g. a malformed address; jax raises several types
        raise SystemExit(f"--distributed: {where} could not join the job: {err}") from None
    finally:
        joined.set()
    print(
        f"process {jax.process_index()} of {jax.process_count()} joined the job at "
        f"{coordinator} ({jax.local_device_count()} of the job's {jax.device_count()} devices "
        "here)",
        file=sys.stderr,
        flush=True,
    )


# Seconds jax's own join bound runs past ``--join-timeout`` (see ``initialize_distributed``).
JOIN_BACKSTOP_S = 10
EXIT_NOT_JOINED = 3


def _exit_unless_joined(
    joined: threading.Event, join_timeout: int, where: str, num_processes: int | None
) -> None:
    # jax.distributed.initialize releases the GIL while it waits, so this thread gets to run.
    if joined.wait(join_timeout):
        return
    last = (num_processes or 1) - 1
    print(
        f"\n--distributed: {where}: not all processes joined the job within --join-timeout "
        f"{join_timeout} s. Start the same command in every process, --process-id 0 to {last}, "
        "all within that time; process 0 must run on the coordinator's host, with the port "
        "free there and reachable from the other hosts.",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_NOT_JOINED)  # the main thread is blocked inside jax; nothing else can stop it


def decided_by_process_0(decide: Callable[[], Any]) -> Any:
    """``decide()`` run on process 0 alone; every process returns its (JSON-able) result.

    So that all processes of a job use one run directory, named from one clock. An error on
    process 0 (e.g. a ``--resume`` flag that conflicts) is raised on every process, so none
    waits for a decision that never comes.
    """
    from jax.experimental import multihost_utils

    payload = b""
    if jax.process_index() == 0:
        try:
            payload = json.dumps({"value": decide()}).encode()
        except SystemExit as exit_:
            payload = json.dumps({"error": str(exit_.code)}).encode()
        except Exception as err:
            payload = json.dumps({"error": f"process 0: {type(err).__name__}: {err}"}).encode()
    # Two broadcasts: the length, then the bytes (every process must pass the same shape).
    length = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    buffer = np.frombuffer(payload, np.uint8) if payload else np.zeros(length, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
    decision = json.loads(received.tobytes().decode())
    if "error" in decision:
        raise SystemExit(decision["error"])
    return decision["value"]


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
