"""Triton N:M kernels: the three training GEMMs with masks in registers, and standalone kernels.

One kernel per module (Triton-tutorial style: tiling docstring, autotune configs, a launcher that
checks shapes and dtypes): ``sparse_forward``, ``input_grad``, ``weight_grad`` (the GEMMs),
``nm_mask``, ``perm_score``, ``mvue``, ``operand24`` and ``srste`` (where no GEMM absorbs the work),
``compress24`` and ``gather_t`` (the 2:4 path's compression and ``dY[:, P]ᵀ``); ``sparse24`` wraps
PyTorch's 2:4 compressed GEMM. ``ops`` registers the custom ops the lowering pass puts into
compiled graphs; ``measure`` times them for ``auto``. Under ``TRITON_INTERPRET=1`` (set before this
package is imported) every kernel runs on the CPU, for tests. ``cpu_mask`` (C, no Triton) is the
exception: the portable CPU path imports it, so this package imports without Triton, and then
exports nothing.
"""

import importlib.util

__all__: list[str] = []


def triton_installed() -> bool:
    """Whether Triton can be imported: what every kernel here but ``cpu_mask`` needs."""
    return importlib.util.find_spec("triton") is not None


if triton_installed():
    from .common import interpreting
    from .input_grad import sparse_input_grad
    from .mvue import mvue_prune
    from .nm_mask import nm_mask
    from .perm_score import permutation_scores, search_permutation
    from .sparse_forward import sparse_linear_forward
    from .weight_grad import sparse_weight_grad

    __all__ = [
        "interpreting",
        "mvue_prune",
        "nm_mask",
        "permutation_scores",
        "search_permutation",
        "sparse_input_grad",
        "sparse_linear_forward",
        "sparse_weight_grad",
    ]
