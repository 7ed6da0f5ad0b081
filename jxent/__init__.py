"""jxent: numerically stable softmax, log-sum-exp and cross-entropy for JAX.

Every function has a hand-written ``jax.custom_vjp`` gradient and works under ``jax.jit``,
``jax.vmap`` and ``jax.grad`` (reverse mode at any order).
"""

import jax as _jax

from jxent import _jax_version
from jxent._aux_outputs import CrossEntropyAux
from jxent._binary import sigmoid_binary_cross_entropy
from jxent._cross_entropy import (
    cross_entropy,
    nll_loss,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from jxent._fused_linear import fused_linear_cross_entropy
from jxent._kl import kl_divergence, kl_divergence_with_log_targets
from jxent._logsumexp import logsumexp
from jxent._softmax import log_softmax, softmax

__version__ = "0.1.0"

_jax_version.require_supported_jax(_jax)  # a clear error on a JAX older than the floor

__all__ = [
    "CrossEntropyAux",
    "__version__",
    "cross_entropy",
    "fused_linear_cross_entropy",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "sigmoid_binary_cross_entropy",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
