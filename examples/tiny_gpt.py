"""A character-level GPT trained on the Python standard library's own sources, dense or N:M sparse.

Real text present on every machine (no download): the ``.py`` files of ``sysconfig``'s stdlib,
sorted by path, the last 10 % held out for validation. Every backend option is a flag;
``--dense`` trains the same model with plain ``torch.compile`` as the baseline; ``--compare``
trains both and prints the two validation losses and the sparse model's explain table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import nmcompile
from nmcompile.options import KERNELS

CORPUS_CHARS = 2_000_000


def load_corpus(max_chars: int = CORPUS_CHARS) -> str:
    """Concatenated stdlib ``.py`` sources (sorted paths, tests and site-packages skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if relative[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in relative:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def train_tokens(count: int) -> int:
    """How many of ``count`` corpus tokens train; the other tenth is held out for validation."""
    return int(0.9 * count)


class Data:
    """Byte-level (ASCII, others as ``?``) train/validation token streams with fixed batching."""

    def __init__(self, max_chars: int = CORPUS_CHARS) -> None:
        text = load_corpus(max_chars).encode("ascii", errors="replace")
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long().clamp(max=127)
        split = train_tokens(len(tokens))
        self.train, self.val = tokens[:split], tokens[split:]
        self.vocab = 128

    def batch(self, split: str, size: int, context: int, generator: torch.Generator) -> tuple:
        """``size`` random windows of ``split``: inputs and next-token targets, ``[size, context]`` each."""
        data = self.train if split == "train" else self.val
        start = torch.randint(len(data) - context - 1, (size,), generator=generator)
        offsets = torch.arange(context + 1)
        chunk = data[start[:, None] + offsets]
        return chunk[:, :-1], chunk[:, 1:]


class Block(nn.Module):
    """A pre-norm GPT block: causal self-attention and a 4x feed-forward layer, both residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-norm blocks of nn.Linear, an untied head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


@dataclasses.dataclass
class Settings:
    """Training settings of one run; ``sparsity`` is ``None`` for the dense baseline."""

    steps: int = 600
    batch: int = 32
    context: int = 64
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    lr: float = 3e-3
    eval_interval: int = 100
    eval_batches: int = 8
    seed: int = 0
    corpus_chars: int = CORPUS_CHARS
    sparsity: dict[str, Any] | None = dataclasses.field(default_factory=dict)
    progress: bool = True
    deterministic: bool = True


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled)`` for the block, the caller's setting restored after.
    On: a run repeats bit for bit. Off: Inductor's CPU embedding backward adds in thread order, and the
    sparse model's top-N mask choices grow those last-bit differences into different runs."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@torch.no_grad()
def evaluate(model: nn.Module, compiled: nn.Module, data: Data, s: Settings) -> float:
    """Mean validation loss over a fixed set of batches (the same for every run)."""
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(s.eval_batches):
        x, y = data.batch("val", s.batch, s.context, generator)
        losses.append(F.cross_entropy(compiled(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def train(s: Settings, data: Data | None = None) -> dict[str, Any]:
    """Train one model; returns final validation loss, curves, kept fractions, timing, report."""
    with deterministic_algorithms(s.deterministic):
        return _train(s, data or Data(s.corpus_chars))


def _train(s: Settings, data: Data) -> dict[str, Any]:
    """``train`` under the determinism setting already in force."""
    torch.manual_seed(s.seed)
    model = TinyGPT(data.vocab, s.d_model, s.layers, s.heads, s.context)
    if s.sparsity is None:
        compiled = torch.compile(model)
    else:
        compiled = torch.compile(model, backend="nmsparse", options=s.sparsity)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / s.steps)))
    generator = torch.Generator().manual_seed(s.seed)
    curve, kept = [], []
    start = time.perf_counter()
    bar = tqdm(range(s.steps), disable=not s.progress, desc="dense" if s.sparsity is None else "nmsparse")
    for step in bar:
        x, y = data.batch("train", s.batch, s.context, generator)
        loss = F.cross_entropy(compiled(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if (step + 1) % s.eval_interval == 0 or step + 1 == s.steps:
            curve.append((step + 1, evaluate(model, compiled, data, s)))
            states = nmcompile.sparsity_state(model)
            kept.append((step + 1, {name: st["kept_fraction"] for name, st in states.items()}))
    seconds = time.perf_counter() - start
    result = {"val_loss": curve[-1][1], "curve": curve, "kept_fraction": kept, "seconds": seconds,
              "steps_per_s": s.steps / seconds}  # fmt: skip
    if s.sparsity is not None:
        x, _ = data.batch("val", s.batch, s.context, torch.Generator().manual_seed(0))
        result["report"] = nmcompile.explain(model, x, **s.sparsity)
    return result


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The backend options given on the command line (unset ones keep nmcompile's defaults)."""
    names = [f.name for f in dataclasses.fields(nmcompile.SparsityConfig) if f.name != "seed"]
    options = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if args.seed_option is not None:
        options["seed"] = args.seed_option
    if options.get("structure_decay") and "total_steps" not in options:
        options["total_steps"] = args.steps
    return options


def min_corpus_chars(context: int) -> int:
    """The fewest corpus characters whose held-out 10 % (as ``Data`` splits it) holds one batch window."""
    need = context + 2  # a start before len - context - 1, then context + 1 tokens
    chars = need
    while chars - train_tokens(chars) < need:
        chars += 1
    return chars


def check_args(cli: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Exit with a usage error naming the flag of any bad value before any work starts (they failed deep in
    training or dynamo); returns the backend options, checked by ``SparsityConfig``."""
    for name in ("steps", "batch", "context", "d_model", "layers", "heads", "eval_interval"):
        if getattr(args, name) < 1:
            cli.error(f"argument --{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.d_model % args.heads:
        cli.error(f"argument --heads: must divide --d-model {args.d_model}, got {args.heads}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        cli.error(f"argument --lr: must be a finite float > 0, got {args.lr}")
    if not 0 <= args.seed < 2**63:
        cli.error(f"argument --seed: must be in [0, 2**63), got {args.seed}")
    least = min_corpus_chars(args.context)
    if args.corpus_chars < least:
        cli.error(f"argument --corpus-chars: must be >= {least} for --context {args.context} (10 % is held out), "
                  f"got {args.corpus_chars}")  # fmt: skip
    options = _options(args)
    given = [k for k in options if k != "total_steps" or args.total_steps is not None]
    if args.dense and given:
        flags = ", ".join(_flag(args, k) for k in given)
        cli.error(f"argument --dense: the dense baseline takes no nmsparse options, got {flags}")
    try:
        nmcompile.SparsityConfig.from_options(options)
    except nmcompile.SparsityConfigError as err:
        cli.error(f"argument {_flag(args, err.option)}: {err}")
    return options


def _flag(args: argparse.Namespace, option: str) -> str:
    """The flag that gave backend option ``option``: ``seed`` is ``--sparsity-seed`` (``--seed``
    seeds the run), and a ``total_steps`` that structure decay took from the run is ``--steps``."""
    if option == "seed":
        return "--sparsity-seed"
    if option == "total_steps" and args.total_steps is None:
        return "--steps"
    return f"--{option.replace('_', '-')}"


DEFAULT = "default: %(default)s"


def parser() -> argparse.ArgumentParser:
    """The command line: run settings, and one flag per backend option (unset: nmcompile's default)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    for name in ("steps", "batch", "context", "d_model", "layers", "heads", "eval_interval", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name), help=DEFAULT)
    parser.add_argument("--lr", type=float, default=defaults.lr, help=DEFAULT)
    parser.add_argument(
        "--corpus-chars", type=int, default=defaults.corpus_chars, help="characters of the corpus read; " + DEFAULT
    )
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--dense", action="store_true", help="train the dense baseline (plain torch.compile)")
    runs.add_argument("--compare", action="store_true", help="train dense and sparse, print both")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=defaults.deterministic,
        help="torch.use_deterministic_algorithms during training, so a run repeats bit for bit; " + DEFAULT,
    )
    group = parser.add_argument_group("nmsparse options (see README)")
    group.add_argument("--n", type=int)
    group.add_argument("--m", type=int)
    group.add_argument("--backward", choices=["bimask", "transposable", "dense"])
    group.add_argument("--perm-candidates", dest="perm_candidates", type=int)
    group.add_argument("--perm-interval", dest="perm_interval", type=int)
    group.add_argument("--perm-swaps", dest="perm_swaps", type=int)
    group.add_argument("--srste-lambda", dest="srste_lambda", type=float)
    group.add_argument("--sparsity-seed", dest="seed_option", type=int, help="the backend's seed option")
    group.add_argument("--include", nargs="*")
    group.add_argument("--exclude", nargs="*")
    group.add_argument("--inner", choices=["inductor", "aot_eager"])
    group.add_argument("--grad-prune", dest="grad_prune", choices=["none", "mvue12", "mvue24", "mvue24_approx"])
    group.add_argument("--mask-decay", dest="mask_decay", choices=["none", "linear", "exponential"])
    group.add_argument("--mask-decay-rate", dest="mask_decay_rate", type=float)
    group.add_argument("--structure-decay", dest="structure_decay", action="store_true", default=None)
    group.add_argument("--dense-steps", dest="dense_steps", type=int)
    group.add_argument("--finetune-steps", dest="finetune_steps", type=int)
    group.add_argument("--total-steps", dest="total_steps", type=int)
    group.add_argument("--kernels", choices=KERNELS)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, train dense and/or sparse, print the losses and report; the runs."""
    cli = parser()
    args = cli.parse_args(argv)
    options = check_args(cli, args)
    settings = {n: getattr(args, n) for n in ("steps", "batch", "context", "d_model", "layers", "heads", "lr",
                                              "eval_interval", "seed", "corpus_chars", "deterministic")}  # fmt: skip
    data = Data(args.corpus_chars)
    print(f"corpus: {len(data.train) + len(data.val):,} characters of the Python standard library "
          f"({len(data.val):,} held out)")  # fmt: skip
    runs: dict[str, Any] = {}
    if args.dense or args.compare:
        runs["dense"] = train(Settings(**settings, sparsity=None, progress=not args.quiet), data)
    if not args.dense:
        runs["nmsparse"] = train(Settings(**settings, sparsity=options, progress=not args.quiet), data)
    print("\nvalidation loss (nats/char):")
    for name, result in runs.items():
        settings_text = ", ".join(f"{k}={v}" for k, v in options.items()) or "2:4 bimask (defaults)"
        label = "dense (torch.compile, Inductor)" if name == "dense" else f"nmsparse {settings_text}"
        print(f"  {label:40s} {result['val_loss']:.4f}   ({result['steps_per_s']:.1f} steps/s)")
    if "nmsparse" in runs:
        print("\n" + str(runs["nmsparse"]["report"]))
    return runs


if __name__ == "__main__":
    main()
