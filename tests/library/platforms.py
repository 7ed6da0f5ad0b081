"""Tracing the GPU / TPU code paths on the CPU (``jxent._reductions.simulated_platform``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

from jxent import _reductions


@contextlib.contextmanager
def simulated(platform: str | None) -> Iterator[None]:
    """Trace for ``platform``'s code path (None: the CPU's), caches cleared: the simulated
    platform is no part of jit's cache key."""
    jax.clear_caches()
    _reductions.simulated_platform = platform
    try:
        yield
    finally:
        _reductions.simulated_platform = None
        jax.clear_caches()
