"""Compile-time timing of one linear layer's training step, for ``kernels='auto'``.

``auto`` runs a layer on 2:4 sparse tensor cores only where that measures faster than the fused
Triton kernels, on this GPU and for this layer's shapes: each candidate op runs its forward and
backward on random operands of those shapes (``triton.testing.do_bench``: warm-up excluded, the
median of a few dozen steps). Results are cached per case for the process, so recompiles and
layers of one shape measure once. The operands come from a private generator (the user's RNG
streams are untouched) and are freed afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from nmcompile import reference

CANDIDATES = {"triton": "triton_linear", "sparse24": "sparse24_linear"}  # kernels name -> nmsparse op


@dataclasses.dataclass(frozen=True)
class LinearCase:
    """What one layer's timed step depends on: shapes, dtypes, device and the op arguments that
    change the work (a loaded mask, Bi-Mask's permutation, structure decay, MVUE, SR-STE)."""

    x_shape: tuple[int, ...]
    x_dtype: torch.dtype
    weight_shape: tuple[int, int]  # [O, K]
    weight_dtype: torch.dtype
    device: torch.device
    autocast: torch.dtype | None  # the autocast dtype the step runs under, or None
    n: int
    m: int
    has_bias: bool
    load_mask: bool
    bimask: bool
    n_eff: bool
    step: bool
    srste_lambda: float
    grad_prune: str


def _operands(case: LinearCase) -> tuple[tuple, list[torch.Tensor], torch.Tensor]:
    """The op's arguments, its leaves (which get gradients) and an output gradient, all random."""
    generator = torch.Generator(device=case.device).manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(shape, generator=generator, device=case.device) * scale
        return t.to(dtype).requires_grad_()

    (O, K), wdtype = case.weight_shape, case.weight_dtype
    x = randn(*case.x_shape, dtype=case.x_dtype)
    w = randn(O, K, dtype=wdtype, scale=K**-0.5)
    bias = randn(O, dtype=wdtype) if case.has_bias else None
    mask = reference.nm_mask(w.detach(), case.n, case.m, 1) if case.load_mask else None  # any mask times alike
    perm = torch.randperm(O, generator=generator, device=case.device) if case.bimask else None
    n_eff = torch.tensor(case.n) if case.n_eff else None
    step = torch.tensor(1) if case.step else None
    dy = randn(*case.x_shape[:-1], O, dtype=case.autocast or case.x_dtype).detach()
    n, m = case.n, case.m
    args = (x, w, bias, mask, perm, n, m, case.srste_lambda, "measured", n_eff, None, step, case.grad_prune, 0)
    return args, [t for t in (x, w, bias) if t is not None], dy


def _median_ms(fn: Callable[[], None], device: torch.device, leaves: list[torch.Tensor]) -> float:
    """Median milliseconds of ``fn`` after warm-up: CUDA events on a GPU; on the CPU (the tests,
    under the Triton interpreter) ``torch.utils.benchmark``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=40, grad_to_none=leaves, return_mode="median"))
    from torch.utils import benchmark

    fn()
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.01).median * 1e3


@functools.cache
def step_ms(kernels: str, case: LinearCase) -> float:
    """Median milliseconds of one forward and backward of the ``kernels`` candidate's op on ``case``."""
    import nmcompile.kernels.ops  # noqa: F401  (registers nmsparse::triton_linear and sparse24_linear)

    op = getattr(torch.ops.nmsparse, CANDIDATES[kernels]).default
    with unset_fake_temporarily(), torch.inference_mode(False), torch.enable_grad():
        args, leaves, dy = _operands(case)

        def step() -> None:
            with torch.autocast(case.device.type, dtype=case.autocast, enabled=case.autocast is not None):
                y = op(*args)
            y.backward(dy)

        return _median_ms(step, case.device, leaves)
