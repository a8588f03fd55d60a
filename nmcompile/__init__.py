"""nmcompile: N:M sparse training (Bi-Mask) through ``torch.compile(model, backend="nmsparse")``."""

from nmcompile import _checkout  # noqa: F401  (first: the passes of a checkout no install maps)
from nmcompile import ops as _ops  # noqa: F401  (registers the nmsparse:: custom ops)
from nmcompile.backend import NMSparseBackend, backend, nmsparse
from nmcompile.inspection import Report, explain
from nmcompile.options import SparsityConfig, SparsityConfigError
from nmcompile.reference import mvue_prune
from nmcompile.state import SparsityStates, forward_weights, sparsity_state

__all__ = [
    "NMSparseBackend",
    "Report",
    "SparsityConfig",
    "SparsityConfigError",
    "SparsityStates",
    "backend",
    "explain",
    "forward_weights",
    "mvue_prune",
    "nmsparse",
    "sparsity_state",
]
__version__ = "0.1.0"
