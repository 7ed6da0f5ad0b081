"""The oldest JAX jxent works with, checked when jxent is imported.

pip enforces ``jax>=0.8.2`` from pyproject.toml, but JAX can arrive by other routes (``--no-deps``,
conda, a vendored copy); there an older JAX would fail deep inside a loss with an
``AttributeError``. This check fails at import instead, naming what is missing.
"""

from __future__ import annotations

from types import ModuleType

MIN_JAX = "0.8.2"  # pyproject.toml's floor; docs/compatibility.md says how it was chosen
# The JAX APIs jxent calls that older releases lack, each with the first release that has it
# (read off the released wheels; 0.5.1-0.5.3 were not read, so typeof may be older).
REQUIRED = {
    "lax.pcast": "0.8.2",  # the fused loss's weight gradient inside shard_map
    "sharding.reshard": "0.7.0",  # labels and masks resharded like the logits
    "shard_map": "0.6.1",  # per-shard kernels under explicit mesh axes
    "typeof": "0.6.0",  # an array's sharding in its type
}


def missing_features(jax: ModuleType) -> list[str]:
    """The entries of ``REQUIRED`` that ``jax`` lacks, as ``jax.<path> (JAX <version>)``."""
    missing = []
    for path, since in REQUIRED.items():
        owner: object = jax
        for name in path.split("."):
            owner = getattr(owner, name, None)
        if owner is None:
            missing.append(f"jax.{path} (JAX {since})")
    return missing


def require_supported_jax(jax: ModuleType) -> None:
    """Raises ``ImportError`` naming the missing APIs if ``jax`` is older than ``MIN_JAX``."""
    missing = missing_features(jax)
    if missing:
        version = getattr(jax, "__version__", "unknown")
        raise ImportError(
            f"jxent needs JAX >= {MIN_JAX}; the installed jax {version} lacks "
            f"{', '.join(missing)}. Upgrade with: pip install -U 'jax>={MIN_JAX}' "
            f"'jaxlib>={MIN_JAX}'"
        )
