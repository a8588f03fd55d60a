"""Launched by tests/test_distributed.py: trains an MLP for 10 steps on 2 CPU processes (gloo)
with DDP and nmsparse, and saves each rank's losses, weights and permutations."""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import MLP

import nmcompile

STEPS, GLOBAL_BATCH = 10, 16


def batches():
    """The same global batches in every process."""
    generator = torch.Generator().manual_seed(123)
    return [(torch.randn(GLOBAL_BATCH, 32, generator=generator), torch.randn(GLOBAL_BATCH, 16, generator=generator))
            for _ in range(STEPS)]  # fmt: skip


def train(rank: int, world: int, order: str, options: dict, out: str) -> None:
    """One rank: its share of every global batch; DDP averages the gradients."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("NMSPARSE_TEST_PORT", "29511"))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = MLP(32, 512, 16)  # a 1 MB layer: DDP's graph splitting makes several buckets
    records = []
    backend = nmcompile.NMSparseBackend(nmcompile.SparsityConfig(**options), on_compile=records.append)
    if world == 1:
        runner = torch.compile(model, backend=backend)
    elif order == "ddp_of_compiled":
        runner = DistributedDataParallel(torch.compile(model, backend=backend))
    elif order == "compiled_of_ddp":  # small buckets: DDP's graph splitting calls the backend per bucket
        runner = torch.compile(DistributedDataParallel(model, bucket_cap_mb=1), backend=backend)
    else:  # fsdp2
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        runner = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    share = GLOBAL_BATCH // world
    losses = []
    for x, y in batches():
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        loss = nn.functional.mse_loss(runner(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    perms = {k: v["perm"] for k, v in nmcompile.sparsity_state(model).items()}
    result = {"losses": losses, "weights": model.state_dict(), "perms": perms, "compiles": len(records)}
    if order == "fsdp2":
        result.update(_fsdp2_checkpoint(model, backend, x))
        result["via_dcp"] = _fsdp2_dcp(model, backend, x, f"{out}/dcp")
    torch.save(result, f"{out}/{order}_rank{rank}_{world}.pt")
    if world > 1:
        dist.destroy_process_group()


def _fsdp2_checkpoint(model: nn.Module, backend: nmcompile.NMSparseBackend, x: torch.Tensor) -> dict:
    """The layer steps an FSDP2 model's checkpoint carries, the states of a fresh FSDP2 model that
    loads it, after one more step, and the warnings a load without states gives."""
    from torch.distributed.fsdp import fully_shard

    checkpoint = model.state_dict()
    saved = {f"{module}.{name}": entry["step"] for module, meta in checkpoint._metadata.items()
             for name, entry in meta.get("nmsparse", {}).items()}  # fmt: skip
    resumed = MLP(32, 512, 16)
    fully_shard(resumed)
    resumed.load_state_dict(checkpoint)
    torch.compile(resumed, backend=backend)(x).sum().backward()
    states = nmcompile.sparsity_state(resumed)
    plain = MLP(32, 512, 16)  # a checkpoint without sparsity state (no _metadata) warns at the first forward
    fully_shard(plain)
    plain.load_state_dict(dict(checkpoint))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(plain, backend=backend)(x).sum().backward()
    warned = [str(w.message) for w in caught if "no sparsity state" in str(w.message)]
    return {"saved_steps": saved, "resumed": {k: (v["step"], v["perm"]) for k, v in states.items()},
            "old_checkpoint_warnings": len(warned)}  # fmt: skip


def _fsdp2_dcp(model: nn.Module, backend: nmcompile.NMSparseBackend, x: torch.Tensor, path: str) -> dict:
    """Steps and permutations of a fresh FSDP2 model resumed through ``dcp.save``/``dcp.load``, the
    states beside the weights in ``SparsityStates``, after one more step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    dcp.save({"model": model.state_dict(), "nmsparse": nmcompile.SparsityStates(model)}, checkpoint_id=path)
    resumed = MLP(32, 512, 16)
    fully_shard(resumed)
    dcp.load({"model": resumed.state_dict(), "nmsparse": nmcompile.SparsityStates(resumed)}, checkpoint_id=path)
    torch.compile(resumed, backend=backend)(x).sum().backward()
    return {k: (v["step"], v["perm"]) for k, v in nmcompile.sparsity_state(resumed).items()}


if __name__ == "__main__":
    order, out, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
    options = {"inner": "aot_eager", "perm_interval": 3, **eval(sys.argv[4])}  # the test passes a dict literal
    if world == 1:
        train(0, 1, order, options, out)
    else:
        mp.spawn(train, args=(world, order, options, out), nprocs=world, join=True)
