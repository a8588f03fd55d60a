"""The shortest complete use of nmcompile: one line turns an ordinary training loop N:M sparse.

Trains a small MLP on a synthetic regression task with ``torch.compile(model, backend="nmsparse")``
(2:4 Bi-Mask by default), then prints what was sparsified and the rewritten backward graph.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import nmcompile


def make_model() -> nn.Module:
    """A three-layer MLP, 64 → 256 → 256 → 10: three Linear layers for nmsparse to sparsify."""
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))


def train(steps: int = 60, inner: str = "inductor") -> list[float]:
    """Train for ``steps`` steps and return the losses."""
    torch.manual_seed(0)
    teacher = make_model()
    model = make_model()
    compiled = torch.compile(model, backend="nmsparse", options={"inner": inner, "perm_interval": 20})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        x = torch.randn(128, 64)
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(compiled(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    print("\nsparsity state:")
    for name, state in nmcompile.sparsity_state(model).items():
        print(
            f"  {name:10s} step={state['step']:3d} backward={state['backward']:6s} "
            f"kept_fraction={state['kept_fraction']:.3f}"
        )
    report = nmcompile.explain(model, torch.randn(128, 64), inner=inner)
    print("\nexplain:\n" + str(report))
    print("\nrewritten backward graph:\n" + report.backward_graph.code)
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    """Parse the flags (a usage error naming a bad one before any work starts), train, return the losses."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60, help="default: %(default)s")
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"], help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"argument --steps: must be >= 1, got {args.steps}")
    return train(args.steps, args.inner)


if __name__ == "__main__":
    main()
