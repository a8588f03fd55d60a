"""torch.library.opcheck on every nmsparse custom op: schema, fake kernels (shapes and strides),
autograd registration and AOT dispatch with dynamic shapes, on contiguous and strided inputs."""

from __future__ import annotations

import pytest
import torch

import nmcompile  # noqa: F401  (registers the ops)
from nmcompile import reference
from nmcompile.ops import masked_weight

ops = torch.ops.nmsparse


def _w(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


MASK_CASES = [
    (ops.nm_mask.default, (_w(8, 16), 2, 4, 1)),
    (ops.nm_mask.default, (_w(16, 8).t(), 2, 4, 1)),  # non-contiguous
    (ops.nm_mask.default, (_w(8, 16, 3, 3), 1, 4, 0)),
    (ops.nm_mask.default, (_w(8, 16), 1, 8, 1, torch.tensor(3))),
    (ops.transposable_mask.default, (_w(8, 16), 2, 4)),
    (ops.transposable_mask.default, (_w(8, 16, 3, 3), 2, 4)),  # conv: per kernel position
    (ops.transposable_mask.default, (_w(16, 16), 1, 8, torch.tensor(2))),
]


@pytest.mark.parametrize(("op", "args"), MASK_CASES)
def test_mask_ops(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("rule", ["mvue12", "mvue24", "mvue24_approx"])
@pytest.mark.parametrize("grad", [_w(10, 6), _w(6, 10).t()], ids=["contiguous", "transposed"])
def test_mvue_prune_op(rule, grad):
    torch.library.opcheck(ops.mvue_prune.default, (grad, torch.tensor(3), 123, rule))


@pytest.mark.parametrize("op", ["transposable_mask", "mvue_prune"])
def test_mask_and_pruning_ops_return_tensors_without_autograd_history(op):
    """Never differentiated (``ops.gradless_op``): given a tensor that requires grad, the op returns
    the value it returns for the detached tensor, with no autograd history."""
    w = _w(8, 16).requires_grad_()
    args = (w, 2, 4) if op == "transposable_mask" else (w, torch.tensor(3), 123, "mvue24")
    out = getattr(ops, op).default(*args)
    expected = getattr(ops, op).default(w.detach(), *args[1:])
    assert torch.equal(out, expected) and out.dtype == (torch.bool if op == "transposable_mask" else w.dtype)
    assert out.grad_fn is None and not out.requires_grad


def _linear_args(perm: bool, recipe: bool) -> tuple:
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = _w(8, 16).requires_grad_()
    b = torch.randn(8, requires_grad=True)
    mask = reference.nm_mask(w, 2, 4, 1)
    extra = (None, torch.tensor(0.5), torch.tensor(2), "mvue24", 7) if recipe else ()
    return (x, w, b, masked_weight(w, mask).detach(), torch.randperm(8) if perm else None, 2, 4, 2e-4, "fc", *extra)


@pytest.mark.parametrize("op", ["sparse_linear", "cpu_linear"])
@pytest.mark.parametrize("perm", [True, False])
@pytest.mark.parametrize("recipe", [True, False])
def test_sparse_linear_op(op, perm, recipe):
    torch.library.opcheck(getattr(ops, op).default, _linear_args(perm, recipe))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("recipe", [True, False])
def test_sparse_conv_op(channels_last, recipe):
    x = torch.randn(2, 8, 6, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = _w(8, 8, 3, 3).requires_grad_()
    mask = reference.nm_mask(w, 2, 4, 1)
    extra = (torch.tensor(2), torch.tensor(0.25), torch.tensor(1), "mvue12", 3) if recipe else ()
    masked = masked_weight(w, mask).detach()
    args = (x.requires_grad_(), w, None, masked, torch.randperm(8), [2, 2], [1, 1], [1, 1], 1, 2, 4, 0.0, "c", *extra)
    torch.library.opcheck(ops.sparse_conv.default, args)


def _conv_args() -> tuple:
    w = _w(8, 8, 3, 3).requires_grad_()
    masked = masked_weight(w, reference.nm_mask(w, 2, 4, 1)).detach()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    return (x, w, None, masked, torch.randperm(8), [1, 1], [1, 1], [1, 1], 1, 2, 4, 2e-4, "c")


@pytest.mark.parametrize("op", ["sparse_linear", "sparse_conv"])
def test_nograd_overloads_compute_the_op_without_autograd_history(op):
    """``<op>.nograd``, which the compiled graphs call in place of the op (``ops.NO_GRAD_OVERLOADS``),
    passes ``opcheck`` and returns the op's output bit for bit, with no autograd history."""
    args = _linear_args(perm=True, recipe=True) if op == "sparse_linear" else _conv_args()
    packet = getattr(ops, op)
    torch.library.opcheck(packet.nograd, args)
    out = packet.nograd(*args)
    assert torch.equal(out, packet.default(*args)) and out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("op", ["sparse_linear", "sparse_conv"])
def test_sparse_ops_backward_under_an_eager_checkpoint(op):
    """Run eagerly under ``torch.utils.checkpoint`` (the graph a reused block's variant runs, with
    its checkpoint regions), the sparse ops' backward reads each saved tensor once, as the
    checkpoint's hooks require (it read them twice: ``CheckpointError``), and gives the gradients
    of the same op without the checkpoint."""
    args = _linear_args(perm=True, recipe=True) if op == "sparse_linear" else _conv_args()
    fn = getattr(ops, op).default
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = []
    for checkpointed in (False, True):
        out = torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False) if checkpointed else fn(*args)
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


def test_ops_reading_step_or_n_on_the_host_stay_out_of_cuda_graphs():
    """Every registered op with a ``step`` or ``n_eff`` tensor argument (a CPU tensor, mostly read on
    the host: a CUDA graph would replay the recorded value) carries ``cudagraph_unsafe``, so Inductor's graph
    partitions run it each step; only ``nm_mask`` decomposes and needs none (Inductor reads its
    0-d CPU ``n_eff`` as a kernel's scalar argument, and under CUDA graphs copies it to the device
    in a partition of its own)."""
    import nmcompile.kernels.cpu_mask
    import nmcompile.kernels.ops  # noqa: F401  (registers the Triton and 2:4 ops)

    registered = torch._C._dispatch_get_all_op_names()
    names = sorted(n.removeprefix("nmsparse::") for n in registered if n.startswith("nmsparse::"))
    nograd = {f"{gemm}.nograd" for gemm in ("sparse_linear", "sparse_conv", "triton_linear", "sparse24_linear")}
    assert len(names) == 18 and "nm_mask" in names and nograd <= set(names)
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(ops, packet), overload or "default")
        reads_host = bool({"step", "n_eff"} & {a.name for a in op._schema.arguments})
        assert (torch.Tag.cudagraph_unsafe in op.tags) == (reads_host and name != "nm_mask"), name
