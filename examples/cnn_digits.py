"""A small CNN on the 8×8 handwritten digits that scikit-learn ships (real images, no download).

1,797 images of 10 classes, a stratified 80/20 split fixed by the seed; test accuracy reported.
Dense with ``--dense``; otherwise ``torch.compile(model, backend="nmsparse")`` with the options
given as flags (the first convolution has C=1 and stays dense, with the reason in the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import nmcompile


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    """Images scaled to [0, 1] as ``[N, 1, 8, 8]`` and labels, split 80/20 (stratified)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


class DigitCNN(nn.Module):
    """Three 3x3 convs with batch norm and a linear head; the 1-channel stem conv stays dense."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclasses.dataclass
class Settings:
    """One training run: its length, optimizer, width, seed and nmsparse options (``None``: dense)."""

    epochs: int = 15
    batch: int = 64
    lr: float = 3e-3
    width: int = 32
    seed: int = 0
    sparsity: dict[str, Any] | None = dataclasses.field(default_factory=dict)
    progress: bool = True


@torch.no_grad()
def accuracy(model: nn.Module, compiled: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``compiled`` in eval mode (the sparse forward, no step counted)."""
    model.eval()
    correct = (compiled(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def train(s: Settings) -> dict[str, Any]:
    """Train one model; returns test accuracy per epoch, timing and (sparse) the explain report."""
    x_train, y_train, x_test, y_test = load_data(s.seed)
    torch.manual_seed(s.seed)
    model = DigitCNN(s.width)
    if s.sparsity is None:
        compiled = torch.compile(model)
    else:
        compiled = torch.compile(model, backend="nmsparse", options=s.sparsity)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(s.seed)
    curve = []
    start = time.perf_counter()
    bar = tqdm(range(s.epochs), disable=not s.progress, desc="dense" if s.sparsity is None else "nmsparse")
    for epoch in bar:
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(order) - s.batch + 1, s.batch):  # full batches: one graph
            idx = order[i : i + s.batch]
            loss = F.cross_entropy(compiled(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        curve.append((epoch + 1, accuracy(model, compiled, x_test, y_test)))
        bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{curve[-1][1]:.3f}", refresh=False)
    result = {"test_accuracy": curve[-1][1], "curve": curve, "seconds": time.perf_counter() - start}
    if s.sparsity is not None:
        result["report"] = nmcompile.explain(model, x_train[: s.batch], **s.sparsity)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, train, print the accuracy and report; the run's results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=Settings.epochs, help="default: %(default)s")
    parser.add_argument("--width", type=int, default=Settings.width, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=Settings.seed, help="default: %(default)s")
    parser.add_argument("--dense", action="store_true", help="train the dense baseline (plain torch.compile)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--n", type=int)
    parser.add_argument("--m", type=int)
    parser.add_argument("--backward", choices=["bimask", "transposable", "dense"])
    parser.add_argument("--grad-prune", dest="grad_prune", choices=["none", "mvue12", "mvue24", "mvue24_approx"])
    parser.add_argument("--mask-decay", dest="mask_decay", choices=["none", "linear", "exponential"])
    parser.add_argument("--inner", choices=["inductor", "aot_eager"])
    args = parser.parse_args(argv)
    options = {k: getattr(args, k) for k in ("n", "m", "backward", "grad_prune", "mask_decay", "inner")
               if getattr(args, k) is not None}  # fmt: skip
    for name in ("epochs", "width"):  # a bad value failed after training (no epoch) or inside dynamo
        if getattr(args, name) < 1:
            parser.error(f"argument --{name}: must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"argument --seed: must be in [0, 2**32) (scikit-learn's random_state), got {args.seed}")
    if args.dense and options:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in options)
        parser.error(f"argument --dense: the dense baseline takes no nmsparse options, got {flags}")
    try:
        nmcompile.SparsityConfig.from_options(options)
    except nmcompile.SparsityConfigError as err:
        parser.error(f"argument --{err.option.replace('_', '-')}: {err}")
    settings = Settings(epochs=args.epochs, width=args.width, seed=args.seed,
                        sparsity=None if args.dense else options, progress=not args.quiet)  # fmt: skip
    result = train(settings)
    label = "dense" if args.dense else f"nmsparse {options}"
    print(f"\n{label}: test accuracy {result['test_accuracy']:.4f} ({result['seconds']:.0f} s)")
    if not args.dense:
        print(result["report"])
    return result


if __name__ == "__main__":
    main()
