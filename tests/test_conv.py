"""Convolutions (SPEC §1 conv, §3–§6): compiled vs reference, the conv input gradient, grouped convs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, c_mask_kernels, train_and_compare
from torch import nn
from torch._dynamo.utils import counters

import nmcompile
from nmcompile import reference
from nmcompile.state import LayerSpec, candidate_generator, permutation_candidates


class BasicBlock(nn.Module):
    """ResNet basic block with a stride-2 1x1 downsample and BatchNorm."""

    def __init__(self, c_in: int = 16, c_out: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


class Conv1dStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(8, 16, 3, padding=1)
        self.b = nn.Conv1d(16, 16, 4, padding="same", dilation=3)  # asymmetric "same": 4 left, 5 right
        self.c = nn.Conv1d(16, 8, 3, stride=2, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class Conv3dLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(8, 16, 3, padding=1, stride=(1, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 (dense: C/groups = 1), pointwise 1x1, then a grouped 3x3 (sparse per group)."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grouped(torch.relu(self.pw(torch.relu(self.bn(self.dw(x))))))


CONV_MODELS = {
    "basic_block": (BasicBlock, (2, 16, 8, 8)),
    "conv1d_stack": (Conv1dStack, (2, 8, 20)),
    "conv3d": (Conv3dLayer, (1, 8, 4, 6, 4)),
    "depthwise_separable": (DepthwiseSeparable, (2, 16, 6, 6)),
}


@pytest.mark.parametrize("nm", [(2, 4), (1, 4)], ids=lambda nm: f"{nm[0]}:{nm[1]}")
@pytest.mark.parametrize("backward", ["bimask", "transposable", "dense"])
@pytest.mark.parametrize("kind", list(CONV_MODELS))
def test_conv_compiled_matches_reference(kind, backward, nm):
    """5 steps: outputs, all gradients, weights and permutations agree with the reference."""
    cls, shape = CONV_MODELS[kind]
    train_and_compare(cls, shape, n=nm[0], m=nm[1], backward=backward, perm_interval=2, inner="aot_eager")


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
@pytest.mark.parametrize(("kind", "shape"), [("conv1d_stack", (8, 20)), ("conv3d", (8, 4, 6, 4))])
def test_unbatched_conv_input_matches_reference(kind, shape, inner):
    """An unbatched ``[C, *spatial]`` input, which ``F.conv*d`` takes, trains like the reference;
    the graph puts a batch of one around the sparse op (``<layer>_batch``/``<layer>_unbatch``)."""
    cls = CONV_MODELS[kind][0]
    train_and_compare(cls, shape, perm_interval=2, inner=inner)
    rows = nmcompile.explain(cls(), torch.randn(shape), inner="aot_eager").rows
    batched = nmcompile.explain(cls(), torch.randn(1, *shape), inner="aot_eager").rows
    assert [(r.sparse, r.flops) for r in rows] == [(r.sparse, r.flops) for r in batched] and rows[0].sparse


def test_conv_channels_last_and_inductor():
    """Channels-last inputs through Inductor (the default inner compiler) agree as well."""
    train_and_compare(BasicBlock, CONV_MODELS["basic_block"][1], channels_last=True, perm_interval=2)


class ThenOneByOne(nn.Module):
    """A 3x3 then a 1x1 convolution: a 1x1 weight's NCHW and channels-last strides differ only on
    its dims of size 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(torch.relu(self.conv3(x)))


@pytest.mark.parametrize("inputs", ["nchw", "channels_last"])
def test_channels_last_weights_through_inductor(inputs):
    """Weights made channels-last (``model.to(memory_format=torch.channels_last)``), inputs in either
    layout, through Inductor: every gradient agrees with the reference. The 1x1 weight's ``W ⊙ F``
    and ``W ⊙ B`` had kept its channels-last strides on its dims of size 1 where their fake kernels
    promised NCHW ones, so ATen's convolution backward made a channels-last ``dX`` that Inductor's
    stride check refused (an ``AssertionError`` in the first backward)."""
    train_and_compare(
        lambda: ThenOneByOne().to(memory_format=torch.channels_last),
        (2, 8, 6, 6),
        steps=2,
        channels_last=inputs == "channels_last",
        perm_interval=1,
    )


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_channels_last_model_fed_nchw_inputs_keeps_eager_layouts(inner):
    """A channels-last model fed NCHW inputs: outputs channels-last, as ATen's convolution makes
    them where the weight is, and every weight gradient with its weight's strides, also a 1x1
    kernel's on its dims of size 1 (SR-STE's sum had given it NCHW ones, which DDP warns about).
    The output had followed the input alone, so later layers ran NCHW."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ThenOneByOne().to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 6, 6)
    dense = copy.deepcopy(model)
    expected = dense(x)
    expected.sum().backward()
    compiled = torch.compile(model, backend=nmcompile.backend(inner=inner))
    actual = compiled(x)
    actual.sum().backward()
    assert actual.stride() == expected.stride() == (288, 1, 48, 8)
    for (name, mine), theirs in zip(model.named_parameters(), dense.parameters(), strict=True):
        assert mine.grad.stride() == theirs.grad.stride() == mine.stride(), name
    assert model.conv1.weight.stride() == (16, 1, 16, 16)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_reference_keeps_a_1x1_kernels_nchw_layout(dims):
    """A 1x1 convolution of an NCHW weight and input: the reference gives eager's NCHW output (a
    ``.view`` flattens it) and, under bf16 autocast, bitwise the backend's output and gradients
    (``aot_eager``); ``forward_weights`` keeps the weight's strides. ``W ⊙ F`` and ``W ⊙ B`` had
    taken their masks' strides, channels-last on the weight's dims of size 1, so the reference's
    convolutions ran channels-last: the ``.view`` failed and the bf16 gradients differed."""

    class Flattened(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = getattr(nn, f"Conv{dims}d")(16, 32, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).view(x.shape[0], -1)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Flattened()
    ref = reference.sparsify(copy.deepcopy(model))
    x = torch.randn(2, 16, *[4] * dims)
    assert ref.conv(x).stride() == model.conv(x).stride()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = ref(x), compiled(x)
    assert torch.equal(actual, expected)
    expected.float().square().mean().backward()
    actual.float().square().mean().backward()
    assert torch.equal(model.conv.weight.grad, ref.conv.weight.grad)
    assert nmcompile.forward_weights(model)["conv.weight"].stride() == model.conv.weight.stride()


def test_a_3d_convolution_with_a_channels_last_weight_keeps_an_nchw_input_layout_on_cpu():
    """A CPU 3-D convolution follows its input's layout alone, as ATen's meta does: its float64
    kernel gives an NCHW output for a channels-last weight, which ``.view`` flattens; a fake that
    followed the weight made that compile fail (``Cannot view a tensor``)."""

    class Flattened(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(8, 8, 3, padding=1, dtype=torch.float64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).view(x.shape[0], -1)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Flattened().to(memory_format=torch.channels_last_3d)
    ref = reference.sparsify(copy.deepcopy(model))
    x = torch.randn(2, 8, 4, 4, 4, dtype=torch.float64)
    assert model.conv(x).is_contiguous()  # eager's own layout here
    actual = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))(x)
    assert torch.equal(actual, ref(x))


def test_custom_ops_return_the_strides_their_fakes_promise():
    """Real and fake kernels agree on every stride, also on dims of size 1, given inputs whose
    strides there are odd (a channels-last 1x1 weight, one row of a weight, a conv output of 1x1
    positions): Inductor plans its buffers and the layouts of the ATen ops after them from the fakes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import nmcompile.kernels.cpu_mask  # noqa: F401  (registers the C kernels' ops)

    weight = torch.randn(8, 16, 1, 1).to(memory_format=torch.channels_last)
    assert weight.stride() == (16, 1, 16, 16)
    perm, key, step = torch.randperm(8), 3, torch.tensor(2)
    x = torch.randn(2, 16, 3, 3).to(memory_format=torch.channels_last)
    conv = ([1, 1], [0, 0], [1, 1], 1, 2, 4, 0.0, "conv")  # stride, padding, dilation, groups, n, m, λ, name
    calls = {
        "cpu_masked_weight": lambda w, x: torch.ops.nmsparse.cpu_masked_weight(w.view(8, 16)[:1].view(16, 1).t(), 2),
        "cpu_bimask_weight": lambda w, x: torch.ops.nmsparse.cpu_bimask_weight(w, perm, 2),
        "transposable_mask": lambda w, x: torch.ops.nmsparse.transposable_mask(w.view(8, 16), 2, 4),
        "mvue_prune": lambda w, x: torch.ops.nmsparse.mvue_prune(w.view(8, 16)[:, :1], step, key, "mvue24"),
        "sparse_conv": lambda w, x: torch.ops.nmsparse.sparse_conv(x[:, :, :1, :1], w, None, w, None, *conv),
        "sparse_conv_wide": lambda w, x: torch.ops.nmsparse.sparse_conv(x, w, None, w, None, *conv),
    }
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the permutation and step stay real
    fake_weight, fake_x = mode.from_tensor(weight), mode.from_tensor(x)
    mismatches = []
    for name, call in calls.items():
        real = call(weight, x)
        with mode:
            fake = call(fake_weight, fake_x)
        if (real.shape, real.stride()) != (fake.shape, fake.stride()):
            mismatches.append((name, real.stride(), fake.stride()))
    assert mismatches == []


@pytest.mark.parametrize("inputs", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_channels_last_conv_is_bitwise_the_reference(dtype, inputs):
    """A channels-last conv's output, ``dX`` and ``dW`` are bitwise the reference's (``aot_eager``),
    with channels-last inputs and NCHW ones:
    - both hand ``x`` itself to ``convolution_backward`` (the reference handed a stand-in of its
      shape, so the kernel summed in NCHW order: 735 of 2048 fp16 entries differed by an ulp);
    - both run the convolutions with the masked weight in the weight's layout, as eager's
      ``W ⊙ F`` is (the backend's was contiguous: with NCHW inputs, an ulp off in bf16 ``dX``)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU()).to(dtype)
    base = base.to(memory_format=torch.channels_last)
    ref = reference.sparsify(copy.deepcopy(base))
    compiled = torch.compile(base, backend=nmcompile.backend(inner="aot_eager"))
    x = torch.randn(2, 16, 8, 8, dtype=dtype)
    if inputs == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    runs = []
    for model, conv in ((ref, ref[0]), (compiled, base[0])):
        leaf = x.clone().requires_grad_()
        out = model(leaf)
        out.float().square().mean().backward()
        runs.append((out, leaf.grad, conv.weight.grad))
    for what, expected, actual in zip(("output", "dX", "dW"), *runs, strict=True):
        assert torch.equal(actual, expected), what


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_input_gradient_is_conv_transpose_of_dy_with_w_masked_by_b(stride):
    """dX = conv_transpose(dY, W ⊙ B), B per SPEC §4 at every (c, kh, kw), from the reported P."""
    n, m = 2, 4
    conv = nn.Conv2d(8, 16, 3, stride=stride, padding=1)
    compiled = torch.compile(conv, backend=nmcompile.backend(inner="aot_eager", perm_candidates=50))
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    y = compiled(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    perm = nmcompile.sparsity_state(compiled)["weight"]["perm"]
    assert not torch.equal(perm, torch.arange(16))
    w = conv.weight.detach()
    f = torch.zeros_like(w, dtype=torch.bool)  # N:M along C at each (o, kh, kw)
    for o in range(16):
        for kh in range(3):
            for kw in range(3):
                for g in range(0, 8, m):
                    order = sorted(range(m), key=lambda i: (-abs(w[o, g + i, kh, kw].item()), i))
                    for i in order[:n]:
                        f[o, g + i, kh, kw] = True
    wf_perm = (w * f)[perm]
    bp = torch.zeros_like(f)  # N:M along permuted O at each (c, kh, kw)
    for c in range(8):
        for kh in range(3):
            for kw in range(3):
                for g in range(0, 16, m):
                    order = sorted(range(m), key=lambda i: (-abs(wf_perm[g + i, c, kh, kw].item()), i))
                    for i in order[:n]:
                        bp[g + i, c, kh, kw] = True
    b = torch.zeros_like(f)
    b[perm] = bp
    b &= f
    expected = F.conv_transpose2d(dy, w * b, stride=stride, padding=1, output_padding=stride - 1)
    assert_close(x.grad, expected, what="dX")
    assert_close(compiled(x), F.conv2d(x, w * f, conv.bias, stride=stride, padding=1), what="Y")


@pytest.mark.parametrize(
    ("dims", "kernel", "dilation"),
    [(1, 4, 1), (1, 2, 3), (2, (2, 4), (3, 1)), (2, (4, 3), 1)],
    ids=["k4", "k2-d3", "2d-k2x4-d3x1", "2d-k4x3"],
)
def test_asymmetric_same_padding_matches_torch(dims, kernel, dilation):
    """``padding="same"`` with an odd total ``dilation·(k−1)`` pads one more on the right, as PyTorch
    does: Y, dX and dW equal ``F.conv*d(..., padding="same")`` on ``W ⊙ F`` (straight-through, no SR-STE)."""
    torch.manual_seed(0)
    conv = getattr(nn, f"Conv{dims}d")(8, 8, kernel, padding="same", dilation=dilation)
    options = {"inner": "aot_eager", "backward": "dense", "srste_lambda": 0.0}
    compiled = torch.compile(conv, backend=nmcompile.backend(**options))
    x = torch.randn(2, 8, *([9] * dims), requires_grad=True)
    y = compiled(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = conv.weight.detach()
    wf = (w * reference.nm_mask(w, 2, 4, dim=1)).requires_grad_()
    x_ref = x.detach().requires_grad_()
    y_ref = getattr(F, f"conv{dims}d")(x_ref, wf, conv.bias.detach(), padding="same", dilation=dilation)
    y_ref.backward(dy)
    assert y.shape == x.shape
    assert_close(y, y_ref, what="Y")
    assert_close(x.grad, x_ref.grad, what="dX")
    assert_close(conv.weight.grad, wf.grad, what="dW")


class Indivisible(nn.Module):
    """Layers SPEC §10 keeps dense or half-sparse at 2:4: a grouped conv with O/groups = 2, a linear
    with O = 6 (the forward is sparse along K = 100, the input gradient dense) and one with K = 6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(100, 6)
        self.fc2 = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def test_indivisible_layers_stay_dense_alike_in_reference_and_backend():
    """Only ``fc1`` is sparsified, with a dense input gradient (its O is not divisible by 4), in the
    reference as in the backend, and both train alike."""
    torch.manual_seed(0)
    state_ref, state_mine = train_and_compare(Indivisible, (2, 8, 5, 5), inner="aot_eager")
    assert state_ref.keys() == state_mine.keys() == {"fc1.weight"}
    assert state_ref["fc1.weight"]["backward"] == "dense"


@pytest.mark.parametrize("swaps", [0, 8])
def test_grouped_conv_permutation_stays_inside_groups(swaps):
    """Grouped conv: masks per group; every candidate and the chosen P permute within each group,
    and so do ``perm_swaps``' sweeps, which pair blocks of the same group and raise the score."""
    conv = nn.Conv2d(16, 32, 3, padding=1, groups=2)
    compiled = torch.compile(conv, backend=nmcompile.backend(inner="aot_eager", perm_candidates=30, perm_swaps=swaps))
    compiled(torch.randn(2, 16, 5, 5)).sum().backward()
    perm = nmcompile.sparsity_state(compiled)["weight"]["perm"]
    assert not torch.equal(perm, torch.arange(32))
    assert sorted(perm[:16].tolist()) == list(range(16)) and sorted(perm[16:].tolist()) == list(range(16, 32))
    spec = LayerSpec("weight", 0, 32, "bimask", groups=2, config=nmcompile.SparsityConfig(perm_candidates=30))
    generator = candidate_generator(0, 0, 0)
    fmask = reference.nm_mask(conv.weight.detach(), 2, 4, 1)
    candidates = permutation_candidates(spec, generator)
    expected, score = reference.search_permutation(fmask, torch.arange(32), candidates, 2, 4)
    if swaps:
        expected = reference.swap_rows(fmask, expected, 2, 4, swaps, generator, groups=2)
        assert reference.permutation_score(fmask, expected, 2, 4) > score
    assert torch.equal(perm, expected)


def test_conv_report_says_a_sparse_convolution_runs_portable_under_triton():
    """``kernels="triton"`` has no convolution kernel: the report's kernel column says the sparse
    convolution runs portable, and why."""
    report = nmcompile.explain(nn.Conv2d(16, 32, 3, padding=1), torch.randn(2, 16, 6, 6), inner="aot_eager",
                               kernels="triton")  # fmt: skip
    row = {r.name: r for r in report.rows}["weight"]
    assert row.sparse and row.kernel == "portable (convolution: ATen/cuDNN with the portable masks)", row


def test_conv_report_rows():
    """Rows show kernel/stride/groups and implicit-GEMM FLOPs; dense convs say why."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
            self.odd_groups = nn.Conv2d(32, 24, 1, groups=4)  # O/groups = 6
            self.up = nn.ConvTranspose2d(24, 8, 2, stride=2)

        def forward(self, x):
            return self.up(self.odd_groups(self.dw(self.conv(self.stem(x)))))

    report = nmcompile.explain(Net(), torch.randn(2, 3, 8, 8), inner="aot_eager")
    rows = {r.name: r for r in report.rows}
    conv = rows["conv.weight"]
    assert conv.sparse and conv.conv == "k3x3 s2x2 p1x1 d1x1 g1" and conv.weight_shape == (32, 144)
    dense = 2 * (2 * 4 * 4) * 32 * 144
    assert conv.flops == {
        "forward": (dense, dense // 2),
        "input_grad": (dense, dense // 2),
        "weight_grad": (dense, dense),
    }
    assert rows["stem.weight"].reason == "C=3 not divisible by m=4"
    assert rows["dw.weight"].reason == "C/groups=1 not divisible by m=4"
    assert rows["odd_groups.weight"].reason == "grouped conv: O/groups=6 not divisible by m=4"
    assert rows["up.weight"].reason == "transposed convolution" and not rows["up.weight"].sparse
    up_dense = 2 * (2 * 4 * 4) * 24 * (8 * 4)  # transposed: rows are input positions
    assert rows["up.weight"].flops["forward"] == (up_dense, up_dense)
    assert rows["up.weight"].weight_shape == (8, 24 * 4)  # W [24, 8, 2, 2]: O = C_out, K = C_in·k
    grouped = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)  # W [8, 2, 2, 2]: O = 4, K = 8/2·4
    [row] = nmcompile.explain(grouped, torch.randn(1, 8, 3, 3), inner="aot_eager").rows
    assert row.weight_shape == (4, 16) and row.flops["forward"] == (2 * 9 * 4 * 16,) * 2
    table = str(report)
    assert "conv" in table.splitlines()[0] and "k3x3 s2x2" in table
    assert "conv_fwd_conv" in {n.name for n in report.forward_graph.graph.nodes}
    backward = {n.name: str(n.target) for n in report.backward_graph.graph.nodes}
    assert {"conv_bwd_mask", "conv_bwd_input_grad"} <= backward.keys()
    if c_mask_kernels():  # the Bi-Mask weight of a conv on the C kernel too
        assert backward["conv_bwd_mask"] == "nmsparse.cpu_bimask_weight.default" and "conv_bwd_perm" not in backward
    else:
        assert "conv_bwd_perm" in backward


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_small_cnn_trains_without_recompiles():
    """An unchanged loop on a learnable task: loss falls; one training graph after the first step."""
    torch.manual_seed(3)
    templates = torch.randn(4, 4, 8, 8)
    model = SmallCNN()
    compiled = torch.compile(model, backend="nmsparse", options={"inner": "aot_eager", "perm_interval": 5})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        labels = torch.randint(0, 4, (32,))
        x = templates[labels] + 0.5 * torch.randn(32, 4, 8, 8)
        loss = F.cross_entropy(compiled(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 0:
            counters.clear()
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert counters["stats"].get("unique_graphs", 0) == 0, "recompiled after the first step"
    assert nmcompile.sparsity_state(model)["features.3.weight"]["step"] == 40
