"""Test-suite set-up.

Eight host CPU devices let the sharding tests (data- and vocab-parallel) run without
accelerators; the option must be set before JAX creates its backend, hence here.
"""

import jax
import pytest
from hypothesis import settings

jax.config.update("jax_num_cpu_devices", 8)

settings.register_profile("jxent", max_examples=25, deadline=None, print_blob=True)
settings.load_profile("jxent")


@pytest.fixture
def x64():
    """Runs the test body with float64 enabled, then restores the default."""
    with jax.enable_x64(True):
        yield
