"""Data-parallel training on 2 CPU processes (gloo), launched by the test: DDP both ways and FSDP2
match a single process on the global batch; all ranks hold the same permutations (SPEC §5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _run(order: str, out: Path, world: int, options: str = "{}", port: int = 29611) -> None:
    env = {**os.environ, "NMSPARSE_TEST_PORT": str(port)}
    result = subprocess.run([sys.executable, str(WORKER), order, str(out), str(world), options], capture_output=True,
                            text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def _load(out: Path, order: str, rank: int, world: int) -> dict:
    return torch.load(out / f"{order}_rank{rank}_{world}.pt", weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ddp")
    _run("single", out, 1)
    return out, _load(out, "single", 0, 1)


@pytest.mark.parametrize(("order", "port"), [("ddp_of_compiled", 29612), ("compiled_of_ddp", 29613),
                                             ("fsdp2", 29614)])  # fmt: skip
def test_data_parallel_matches_single_process(order, port, single):
    """10 steps on 2 ranks, each half of every global batch: losses, weights and permutations equal
    the single-process run (fp32); torch.compile(DDP(model)) compiles each DDP bucket separately."""
    out, reference = single
    _run(order, out, 2, port=port)
    ranks = [_load(out, order, rank, 2) for rank in range(2)]
    for rank in ranks:
        assert max(abs(a - b) for a, b in zip(rank["losses"], reference["losses"], strict=True)) < 1e-5
        assert sorted(rank["perms"]) == ["fc1.weight", "fc2.weight", "head.weight"]
        for name, perm in reference["perms"].items():
            assert torch.equal(rank["perms"][name], perm), name
        if order != "fsdp2":  # FSDP2 saves sharded weights
            for name, weight in reference["weights"].items():
                assert (rank["weights"][name] - weight).abs().max() < 1e-5, name
    if order == "compiled_of_ddp":
        assert ranks[0]["compiles"] >= 2, "DDP's graph splitting should call the backend once per bucket"
    if order == "fsdp2":  # the checkpoint carries the states, and a fresh FSDP2 model resumes from it (DCP too)
        for rank in ranks:
            assert rank["saved_steps"] == dict.fromkeys(reference["perms"], 10)
            for resumed in (rank["resumed"], rank["via_dcp"]):  # from model.state_dict(), and through DCP
                assert {name: step for name, (step, _) in resumed.items()} == dict.fromkeys(reference["perms"], 11)
                for name, (_, perm) in resumed.items():
                    assert torch.equal(perm, reference["perms"][name]), name
            assert rank["old_checkpoint_warnings"] == 1


def test_mvue_under_ddp_keeps_ranks_in_step(tmp_path):
    """MVUE draws the same random stream on every rank (seed, layer, step): ranks stay identical."""
    _run("ddp_of_compiled", tmp_path, 2, '{"grad_prune": "mvue24"}', port=29615)
    r0, r1 = (_load(tmp_path, "ddp_of_compiled", rank, 2) for rank in range(2))
    assert r0["losses"] == r1["losses"]
    for name in r0["perms"]:
        assert torch.equal(r0["perms"][name], r1["perms"][name])
        assert torch.equal(r0["weights"][name], r1["weights"][name])


_ONE_RANK = """
import os, sys, warnings, torch, torch.nn as nn, torch.distributed as dist
import nmcompile
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
"""


def _run_one_rank(script: str, port: int) -> list[str]:
    """Run ``script`` in a fresh process, after ``_ONE_RANK`` made it a gloo group of one on
    ``port``, and return its output lines (it must exit 0)."""
    command = [sys.executable, "-c", _ONE_RANK + script, str(port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("\n")


# Two Linears, a: 16 -> 32 and b: 32 -> 16: what the scripts below train, put before them.
_MLP_SCRIPT = """
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
"""

_LIMIT_SCRIPT = """
model = MLP()
compiled = torch.compile(nn.parallel.DistributedDataParallel(model), backend=nmcompile.backend(inner="aot_eager"),
                         dynamic=False)
with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for batch in (4, 5, 6, 7):
        compiled(torch.randn(batch, 16)).sum().backward()
print(sorted({s["step"] for s in nmcompile.sparsity_state(model).values()}))
print(sum(str(w.message).startswith("nmsparse: dynamo hit its recompile_limit (2)") for w in caught))
dist.destroy_process_group()
"""


def test_a_compiled_ddp_model_past_the_recompile_limit_warns():
    """``torch.compile(DDP(model))`` past dynamo's recompile limit: dynamo's log names DDP's wrapper
    code, not a function nmsparse compiled, but the refused compile is nmsparse's, so the warning
    comes (it did not), once, as the steps stop at the two compiled shapes."""
    assert _run_one_rank(_MLP_SCRIPT + _LIMIT_SCRIPT, 29615)[:2] == ["[2]", "1"]


_NAMES_SCRIPT = """
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return x + self.out(torch.relu(self.fc(x)))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0, self.b1, self.head = Block(), Block(), nn.Linear(16, 4)

    @torch.compiler.disable
    def body(self, x):
        return self.b1(self.b0(x))

    def forward(self, x):
        return self.head(self.body(x))


model = Model()
for block in (model.b0, model.b1):
    block.compile(backend=nmcompile.backend(inner="aot_eager", include="^fc"))
compiled = nn.parallel.DistributedDataParallel(torch.compile(model, backend="aot_eager"))
for _ in range(2):
    compiled(torch.randn(8, 16)).sum().backward()
print(sorted((k, s["layer_index"], s["step"]) for k, s in nmcompile.sparsity_state(model).items()))
dist.destroy_process_group()
"""


def test_blocks_compiled_alone_under_ddp_keep_their_names():
    """Blocks compiled alone with nmsparse under another backend's compile that skips them, the
    whole under DDP: DDP's graph splitting compiles their frames, and still their own compile names
    their weights, so ``include`` matches (the outer model's names were used: all dense)."""
    assert _run_one_rank(_NAMES_SCRIPT, 29616)[0] == "[('b0.fc.weight', 0, 2), ('b1.fc.weight', 0, 2)]"


_TENSOR_PARALLEL_SCRIPT = """
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

torch.manual_seed(0)
model = MLP()
parallelize_module(model, init_device_mesh("cpu", (1,)), {"a": ColwiseParallel(), "b": RowwiseParallel()})
compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
x = torch.randn(8, 16)
y = compiled(x)
y.sum().backward()
dense = torch.relu(x @ model.a.weight.full_tensor().t() + model.a.bias.full_tensor())
dense = dense @ model.b.weight.full_tensor().t() + model.b.bias.full_tensor()
print(torch.allclose(y, dense, atol=1e-6), model.a.weight.grad is not None, nmcompile.sparsity_state(model))
report = nmcompile.explain(model, x, inner="aot_eager")
print(sorted((row.name, row.sparse, row.reason) for row in report.rows))
dist.destroy_process_group()
"""


def test_tensor_parallel_weights_stay_dense_with_a_reason():
    """Tensor parallelism (``parallelize_module``: DTensor weights inside the graph) has no sharding
    rules for nmsparse's ops: its layers stay dense, say why in the report, and train (the backend's
    first compile raised ``BackendCompilerFailed`` on ``cpu_masked_weight``)."""
    lines = _run_one_rank(_MLP_SCRIPT + _TENSOR_PARALLEL_SCRIPT, 29617)
    why = "a DTensor weight (tensor parallelism): nmsparse's ops have no sharding rules"
    assert lines[:2] == ["True True {}", str([("a.weight", False, why), ("b.weight", False, why)])]
