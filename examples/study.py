"""The accuracy study: the papers' comparisons, reproduced at small scale on real data on a CPU.

Runs a grid of recipes × seeds on two tasks — the character-level GPT on the standard library's
sources (validation loss) and the CNN on scikit-learn's 8×8 digits (test accuracy) — and writes
``docs/results.md`` (tables, the papers' claims next to what was measured), ``docs/study.json``
(raw numbers) and two plots. Run by hand (under an hour on 2 cores); ``--smoke`` is a tiny run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import nmcompile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cnn_digits
import tiny_gpt

# name -> backend options (None: dense baseline). "{steps}" is filled with the run's length.
RECIPES: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "2:4 dense-backward (SR-STE)": {"n": 2, "m": 4, "backward": "dense"},
    "2:4 transposable": {"n": 2, "m": 4, "backward": "transposable"},
    "2:4 bimask": {"n": 2, "m": 4, "backward": "bimask"},
    "1:4 dense-backward (SR-STE)": {"n": 1, "m": 4, "backward": "dense"},
    "1:4 transposable": {"n": 1, "m": 4, "backward": "transposable"},
    "1:4 bimask": {"n": 1, "m": 4, "backward": "bimask"},
    "2:4 bimask + swaps": {"n": 2, "m": 4, "backward": "bimask", "perm_swaps": 20},
    "1:4 bimask + swaps": {"n": 1, "m": 4, "backward": "bimask", "perm_swaps": 20},
    "2:4 bimask + mvue24": {"n": 2, "m": 4, "backward": "bimask", "grad_prune": "mvue24"},
    "1:8 bimask": {"n": 1, "m": 8, "backward": "bimask"},
    "1:8 bimask + structure decay": {
        "n": 1,
        "m": 8,
        "structure_decay": True,
        "total_steps": "{steps}",
        "dense_steps": "{tenth}",
        "finetune_steps": "{tenth}",
    },
    "1:8 bimask + mask decay": {"n": 1, "m": 8, "mask_decay": "linear", "mask_decay_rate": "{half_rate}"},
}

# The grid's size and where it writes: the full study (into docs/), and ``--smoke``'s tiny run (into a
# temporary directory, so it never overwrites the study's results); a flag given on the command line wins.
FULL = {"seeds": [0, 1, 2], "steps": 600, "epochs": 12, "d_model": 128, "layers": 2, "recipes": list(RECIPES),
        "out": Path(__file__).resolve().parents[1] / "docs"}  # fmt: skip
SMOKE = {"seeds": [0], "steps": 8, "epochs": 1, "d_model": 32, "layers": 1,
         "recipes": ["dense", "2:4 bimask", "2:4 transposable"],
         "out": Path(tempfile.gettempdir()) / "nmcompile-study-smoke"}  # fmt: skip


def _options(recipe: dict[str, Any] | None, steps: int) -> dict[str, Any] | None:
    """A recipe's options with the step-dependent placeholders filled in."""
    if recipe is None:
        return None
    fill = {"{steps}": steps, "{tenth}": steps // 10, "{half_rate}": 2.0 / steps}  # α reaches 0 halfway
    return {k: fill.get(v, v) if isinstance(v, str) else v for k, v in recipe.items()}


def _with(options: dict[str, Any] | None, extra: dict[str, Any]) -> dict[str, Any] | None:
    """A sparse recipe's options plus ``extra``; the dense baseline (``None``) stays as it is."""
    return None if options is None else {**options, **extra}


def sparse_gemms(options: dict[str, Any] | None) -> str:
    """Which of the three training GEMMs run N:M at the end of training (forward, dX, dW)."""
    if options is None:
        return "none"
    gemms = ["fwd"]
    if options.get("backward", "bimask") in ("bimask", "transposable"):
        gemms.append("dX")
    if options.get("grad_prune", "none") != "none":
        gemms.append("dW")
    return " + ".join(gemms)


def run_grid(
    seeds: list[int], gpt: tiny_gpt.Settings, cnn: cnn_digits.Settings, recipes: list[str], inner: str | None = None
) -> dict:
    """Every recipe × seed on both tasks; returns raw results keyed by recipe name. ``inner`` is the
    sparse runs' inner compiler (the backend's default, Inductor, when ``None``)."""
    extra = {"inner": inner} if inner else {}
    data = tiny_gpt.Data(gpt.corpus_chars)
    results: dict[str, Any] = {}
    for name in recipes:
        results[name] = {"gpt": [], "cnn": []}
        for seed in seeds:
            torch._dynamo.reset()
            options = _with(_options(RECIPES[name], gpt.steps), extra)
            run = tiny_gpt.train(tiny_gpt.Settings(**{**vars(gpt), "seed": seed, "sparsity": options}), data)
            run.pop("report", None)
            results[name]["gpt"].append(run)
            torch._dynamo.reset()
            cnn_options = _with(_options(RECIPES[name], cnn.epochs * 22), extra)  # 22 full batches per epoch
            cnn_run = cnn_digits.train(cnn_digits.Settings(**{**vars(cnn), "seed": seed, "sparsity": cnn_options}))
            cnn_run.pop("report", None)
            results[name]["cnn"].append(cnn_run)
            print(f"{name:32s} seed {seed}: val loss {run['val_loss']:.4f}  digits acc {cnn_run['test_accuracy']:.4f}",
                  flush=True)  # fmt: skip
    return results


def _stat(values: list[float]) -> str:
    """Mean ± sample standard deviation over seeds (± 0 for one seed), to 4 decimals."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {spread:.4f}"


def _mean(results: dict, name: str, task: str, key: str) -> float:
    return statistics.fmean(r[key] for r in results[name][task])


def _claims(results: dict) -> list[str]:
    """The papers' claims, each with the measured numbers and whether it holds here."""
    out = []

    def compare(claim: str, a: str, b: str, tolerance: float = 0.0) -> None:
        if a not in results or b not in results:
            return
        la, lb = _mean(results, a, "gpt", "val_loss"), _mean(results, b, "gpt", "val_loss")
        aa, ab = _mean(results, a, "cnn", "test_accuracy"), _mean(results, b, "cnn", "test_accuracy")
        holds = la <= lb + tolerance
        verdict = "holds" if holds else "does not hold"
        out.append(f"- {claim}: **{verdict}** on the GPT (val loss {a}: {la:.4f}, {b}: {lb:.4f}; "
                   f"tolerance {tolerance}); digits accuracy {aa:.4f} vs {ab:.4f}.")  # fmt: skip

    for nm in ("2:4", "1:4"):
        compare(f"Bi-Mask matches or beats transposable masks at {nm}", f"{nm} bimask", f"{nm} transposable")
        compare(f"Bi-Mask is close to the dense-backward baseline at {nm} (within 0.02 nats)", f"{nm} bimask",
                f"{nm} dense-backward (SR-STE)", 0.02)  # fmt: skip
        compare(f"Greedy row swaps (`perm_swaps`, beyond the papers) match or beat the random search at {nm}",
                f"{nm} bimask + swaps", f"{nm} bimask")  # fmt: skip
    compare("MVUE 2:4 gradients cost little (within 0.02 nats of Bi-Mask alone)", "2:4 bimask + mvue24",
            "2:4 bimask", 0.02)  # fmt: skip
    compare("Structure decay helps at 1:8", "1:8 bimask + structure decay", "1:8 bimask")
    compare("Mask decay helps at 1:8", "1:8 bimask + mask decay", "1:8 bimask")
    return out


def _plots(results: dict, out: Path) -> list[str]:
    """Validation curves (mean over seeds) and Bi-Mask's kept fraction per layer over steps."""
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, runs) in enumerate(results.items()):
        steps = [s for s, _ in runs["gpt"][0]["curve"]]
        means = [statistics.fmean(r["curve"][k][1] for r in runs["gpt"]) for k in range(len(steps))]
        style = "-" if "bimask" in name or name == "dense" else "--"
        ax.plot(steps, means, label=name, linestyle=style, color=colors[(2 * i) % 20 + (2 * i) // 20])
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("tiny GPT on the Python stdlib: validation loss (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "study_val_curves.png", dpi=120)
    plt.close(fig)
    names = [n for n in ("2:4 bimask", "1:4 bimask") if n in results]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(6 * max(1, len(names)), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        kept = results[name]["gpt"][0]["kept_fraction"]
        for layer in kept[0][1]:
            ax.plot([s for s, _ in kept], [k[layer] for _, k in kept], label=layer)
        ax.set_title(f"{name}: kept fraction of forward weights in the backward")
        ax.set_xlabel("training step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "study_kept_fraction.png", dpi=120)
    plt.close(fig)
    return ["study_val_curves.png", "study_kept_fraction.png"]


def write_report(results: dict, out: Path, args: argparse.Namespace, gpt: tiny_gpt.Settings,
                 cnn: cnn_digits.Settings, seconds: float, argv: list[str]) -> Path:  # fmt: skip
    """Write ``study.json``, the plots and ``results.md``, which opens with ``argv`` as a shell command."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(results, indent=1))
    plots = _plots(results, out)
    lines = [
        "# Accuracy study: the papers' comparisons at small scale",
        "",
        f"Measured with `{shlex.join(['python', 'examples/study.py', *argv])}` on {platform.machine()} CPU "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}, seeds {args.seeds}; "
        f"{seconds / 60:.1f} minutes in all. Raw numbers: `study.json`.",
        "",
        f"- **GPT**: a character-level GPT (d_model {gpt.d_model}, {gpt.layers} layers, context {gpt.context}, "
        f"batch {gpt.batch}) trained {gpt.steps} steps with AdamW on {gpt.corpus_chars:,} characters of the "
        "Python standard library's sources. Validation loss in nats/char on held-out text (lower is better).",
        f"- **Digits**: a 3-conv CNN (width {cnn.width}) on scikit-learn's 8×8 digits, {cnn.epochs} epochs; "
        "test accuracy on a stratified 20 % split.",
        "- `N:M GEMMs` says which of the three training GEMMs run N:M at the end of training: fwd, input "
        "gradient dX, weight gradient dW. Time is the mean wall time of one GPT run, compile included.",
        "",
        "| recipe | N:M GEMMs | GPT val loss | digits test acc | GPT time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        options = _options(RECIPES[name], args.steps)
        lines.append(
            f"| {name} | {sparse_gemms(options)} | {_stat([r['val_loss'] for r in runs['gpt']])} | "
            f"{_stat([r['test_accuracy'] for r in runs['cnn']])} | "
            f"{statistics.fmean(r['seconds'] for r in runs['gpt']):.0f} |"
        )
    lines += ["", "## The papers' claims, checked here", "", *_claims(results), ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def _check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """A usage error, before any work, where the report could not be written in ``out`` (a file, a
    place where nothing can be made): the report comes after the whole study, which was lost."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        parser.error(f"argument --out: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        parser.error(f"argument --out: cannot write in {existing} ({err.strerror})")


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, tiny_gpt.Settings, cnn_digits.Settings]:
    """The command line, its unset size flags filled from ``SMOKE`` or ``FULL``, checked before any work
    (a bad value failed after the runs or inside dynamo); returns the arguments and both tasks' settings."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", help=f"default {FULL['seeds']}; --smoke: {SMOKE['seeds']}")
    for name in ("steps", "d_model", "layers", "epochs"):  # GPT steps and size, digits epochs
        sizes = f"default {FULL[name]}; --smoke: {SMOKE[name]}"
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=sizes)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), help=f"default all; --smoke: {SMOKE['recipes']}")
    parser.add_argument("--out", type=Path, help=f"default {FULL['out']}; --smoke: {SMOKE['out']}")
    parser.add_argument("--smoke", action="store_true", help="a tiny run to check the pipeline")
    parser.add_argument("--inner", choices=["inductor", "aot_eager"], help="the sparse runs' inner compiler")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "d_model", "layers", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    heads = tiny_gpt.Settings.heads
    if args.d_model % heads:
        parser.error(f"argument --d-model: must be a multiple of {heads} (the GPT's heads), got {args.d_model}")
    for seed in args.seeds:
        if not 0 <= seed < 2**32:
            parser.error(f"argument --seeds: each must be in [0, 2**32) (scikit-learn's random_state), got {seed}")
    for name in ("seeds", "recipes"):  # a repeat would run again and count twice in the mean ± spread
        repeated = sorted({v for v in getattr(args, name) if getattr(args, name).count(v) > 1}, key=str)
        if repeated:
            parser.error(f"argument --{name}: each at most once, got {' '.join(map(str, repeated))} more than once")
    _check_out(parser, args.out)
    extra = {"inner": args.inner} if args.inner else {}
    for name in args.recipes:  # the GPT's steps fill the recipes' placeholders (the CNN's 22 per epoch always fit)
        try:
            nmcompile.SparsityConfig.from_options(_with(_options(RECIPES[name], args.steps), extra))
        except nmcompile.SparsityConfigError as err:
            parser.error(f"argument --recipes: {name!r} cannot run with --steps {args.steps}: {err}")
    gpt = tiny_gpt.Settings(steps=args.steps, d_model=args.d_model, layers=args.layers, progress=False,
                            eval_interval=max(1, args.steps // 12))  # fmt: skip
    cnn = cnn_digits.Settings(epochs=args.epochs, progress=False)
    if args.smoke:
        gpt = tiny_gpt.Settings(steps=args.steps, batch=4, context=16, d_model=args.d_model, layers=args.layers,
                                eval_interval=2, eval_batches=1, corpus_chars=20_000, progress=False)  # fmt: skip
        cnn = cnn_digits.Settings(epochs=args.epochs, width=8, progress=False)
    return args, gpt, cnn


def main(argv: list[str] | None = None) -> Path:
    """Run the study the command line asks for and write its report; returns the path of ``results.md``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, gpt, cnn = parse(argv)
    start = time.perf_counter()
    results = run_grid(args.seeds, gpt, cnn, args.recipes, args.inner)
    path = write_report(results, args.out, args, gpt, cnn, time.perf_counter() - start, argv)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
