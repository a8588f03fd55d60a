"""Tiny-size smoke tests of every example: they run end to end, report what they promise, and reject bad flags."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from conftest import deterministic_algorithms

import nmcompile

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


TINY_GPT = ["--steps", "4", "--eval-interval", "2", "--batch", "4", "--context", "16", "--d-model", "32",
            "--layers", "1", "--corpus-chars", "20000", "--quiet", "--inner", "aot_eager"]  # fmt: skip


def test_quickstart_runs():
    """examples/quickstart.py: finite loss that training cuts to under 0.4x its start (0.22x here; with
    the optimizer step a no-op it ends at 0.92x)."""
    losses = _load("quickstart").main(["--steps", "12", "--inner", "aot_eager"])
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.4 * losses[0]


def test_tiny_gpt_compare(capsys):
    """--compare trains dense and sparse on stdlib text and prints both losses and the table; each
    run's validation loss falls from step 2 to step 4 (it stays put when nothing trains)."""
    runs = _load("tiny_gpt").main([*TINY_GPT, "--compare", "--n", "1", "--m", "4", "--grad-prune", "mvue24"])
    assert set(runs) == {"dense", "nmsparse"}
    assert all(math.isfinite(r["val_loss"]) for r in runs.values())
    assert all(r["curve"][1][1] < r["curve"][0][1] for r in runs.values())
    out = capsys.readouterr().out
    assert "validation loss" in out and "dense " in out and "blocks.0.fc.weight" in out and "1:4" in out
    assert [s for s, _ in runs["nmsparse"]["curve"]] == [2, 4]


def test_tiny_gpt_structure_decay_flags():
    """Decay flags reach the backend: the run ends at the target N."""
    tiny = _load("tiny_gpt")
    runs = tiny.main([*TINY_GPT, "--n", "1", "--m", "8", "--structure-decay"])
    row = next(r for r in runs["nmsparse"]["report"].rows if r.name == "blocks.0.fc.weight")
    assert row.now == "t=4 1:8"


def test_tiny_gpt_has_a_flag_for_every_option():
    """Every backend option has a flag (the README says so), and ``--kernels`` reaches the backend."""
    tiny = _load("tiny_gpt")
    dests = {action.dest for action in tiny.parser()._actions}
    fields = {f.name for f in dataclasses.fields(nmcompile.SparsityConfig)} - {"seed"}
    assert fields <= dests and "seed_option" in dests
    runs = tiny.main([*TINY_GPT, "--kernels", "portable"])
    sparse = [row for row in runs["nmsparse"]["report"].rows if row.sparse]
    assert sparse and all(row.kernel.startswith("portable (kernels='portable'") for row in sparse)


@pytest.mark.parametrize(("flags", "inside"), [([], True), (["--no-deterministic"], False)])
def test_tiny_gpt_trains_under_deterministic_algorithms_by_default(monkeypatch, flags, inside):
    """Training runs under ``torch.use_deterministic_algorithms`` unless ``--no-deterministic``; the
    caller's setting (here a warn-only one) is back afterwards."""
    tiny = _load("tiny_gpt")
    seen = []
    train = tiny._train
    monkeypatch.setattr(tiny, "_train", lambda s, data: seen.append(torch.are_deterministic_algorithms_enabled())
                        or train(s, data))  # fmt: skip
    with deterministic_algorithms(not inside, warn_only=True):
        tiny.main([*TINY_GPT, "--compare", *flags])
        after = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    assert seen == [inside, inside]
    assert after == (not inside, True)


def test_run_flags_reach_the_runs(monkeypatch):
    """The flags pick the runs and their options, as the README lists them: ``--dense`` trains the
    baseline alone (``sparsity=None``), ``--sparsity-seed`` is the backend's ``seed`` (``--seed``
    seeds the run), and cnn_digits' recipe flags reach its backend options."""
    tiny, cnn = _load("tiny_gpt"), _load("cnn_digits")
    seen: list = []
    result = {"val_loss": 1.0, "steps_per_s": 1.0, "test_accuracy": 1.0, "seconds": 1.0, "report": "(report)"}
    monkeypatch.setattr(tiny, "train", lambda settings, data: seen.append(settings) or result)
    monkeypatch.setattr(cnn, "train", lambda settings: seen.append(settings) or result)
    assert list(tiny.main([*TINY_GPT[:-2], "--dense"])) == ["dense"] and seen.pop().sparsity is None
    tiny.main([*TINY_GPT, "--sparsity-seed", "7", "--seed", "3"])
    settings = seen.pop()
    assert settings.seed == 3 and settings.sparsity == {"inner": "aot_eager", "seed": 7}
    cnn.main(["--quiet", "--dense"])
    assert seen.pop().sparsity is None
    cnn.main(["--quiet", "--backward", "dense", "--grad-prune", "mvue24", "--mask-decay", "linear", "--n", "1"])
    assert seen.pop().sparsity == {"n": 1, "backward": "dense", "grad_prune": "mvue24", "mask_decay": "linear"}
    assert not seen


def _help_defaults(name: str, capsys) -> dict[str, str]:
    """``{flag: default}`` from an example's ``--help``: each option's help, its lines joined, ends in
    ``default: <value>`` where it names one."""
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(["--help"])
    assert exit_info.value.code == 0
    options = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    entries = (re.match(r"--([a-z-]+)\S* .*?default: (\S+)", flag) for flag in re.split(r"(?<!,) (?=--)", options))
    return dict(entry.groups() for entry in entries if entry)


def test_help_lists_the_run_flags_defaults(capsys):
    """Each example's ``--help`` gives its run flags' defaults (the README says so), the values the runs
    take when the flag is left out."""
    tiny, cnn = _load("tiny_gpt"), _load("cnn_digits")
    gpt = dataclasses.asdict(tiny.Settings())
    expected = {
        "tiny_gpt": {
            **{f.replace("_", "-"): str(gpt[f]) for f in ("steps", "batch", "context", "d_model", "layers", "heads",
                                                           "eval_interval", "seed", "lr", "corpus_chars")},
            "deterministic": str(gpt["deterministic"]),
        },
        "cnn_digits": {f: str(getattr(cnn.Settings, f)) for f in ("epochs", "width", "seed")},
        "quickstart": {"steps": "60", "inner": "inductor"},
    }  # fmt: skip
    for name, defaults in expected.items():
        assert _help_defaults(name, capsys) == defaults, name


def test_cnn_digits_runs(capsys):
    """One epoch lifts test accuracy above chance (0.21 here; 0.10, chance, when nothing trains) and
    the report names the stem conv that stays dense."""
    result = _load("cnn_digits").main(["--epochs", "1", "--width", "8", "--quiet", "--inner", "aot_eager"])
    assert 0.15 < result["test_accuracy"] <= 1.0
    assert "C=1 not divisible by m=4" in capsys.readouterr().out


def test_study_smoke(tmp_path):
    """The study writes results.md with every requested row, the claims section, both plots, and the command
    line shell-quoted."""
    recipes = ["dense", "2:4 bimask", "2:4 transposable"]
    argv = ["--smoke", "--steps", "4", "--epochs", "1", "--seeds", "0", "--out", str(tmp_path), "--inner", "aot_eager",
            "--recipes", *recipes]  # fmt: skip
    path = _load("study").main(argv)
    text = path.read_text()
    command = text.split("Measured with `", 1)[1].split("`", 1)[0]
    assert "--recipes dense '2:4 bimask' '2:4 transposable'" in command  # re-runs as shown in a shell
    assert shlex.split(command)[2:] == argv
    for name in recipes:
        assert f"| {name} |" in text
    assert "Bi-Mask matches or beats transposable masks at 2:4" in text
    assert (tmp_path / "study_val_curves.png").stat().st_size > 0
    assert (tmp_path / "study_kept_fraction.png").stat().st_size > 0


def test_study_smoke_is_tiny():
    """``--smoke`` alone is a tiny run (few steps, one seed, few recipes); explicit flags still win."""
    study = _load("study")
    args, gpt, cnn = study.parse(["--smoke"])
    assert args.seeds == [0] and len(args.recipes) <= 3 and gpt.steps <= 10 and cnn.epochs == 1
    assert (gpt.d_model, gpt.layers, gpt.corpus_chars, cnn.width) == (32, 1, 20_000, 8)
    explicit = ["--steps", "20", "--epochs", "2", "--seeds", "3", "4", "--recipes", "dense"]
    args, gpt, cnn = study.parse(["--smoke", *explicit])
    assert (args.seeds, args.recipes, gpt.steps, cnn.epochs) == ([3, 4], ["dense"], 20, 2)
    args, gpt, cnn = study.parse([])
    assert args.seeds == [0, 1, 2] and args.recipes == list(study.RECIPES) and (gpt.steps, cnn.epochs) == (600, 12)
    assert args.out == EXAMPLES.parent / "docs" and study.parse(["--smoke"])[0].out != args.out  # smoke keeps docs/


BAD_FLAGS = [
    ("tiny_gpt", ["--steps", "0"], "argument --steps: must be >= 1"),
    ("tiny_gpt", ["--steps", "1", "--eval-interval", "0"], "argument --eval-interval: must be >= 1"),
    ("tiny_gpt", ["--corpus-chars", "5"], "argument --corpus-chars: must be >= 171 for --context 16"),
    ("tiny_gpt", ["--batch", "0"], "argument --batch: must be >= 1"),
    ("tiny_gpt", ["--context", "0"], "argument --context: must be >= 1"),
    ("tiny_gpt", ["--d-model", "0"], "argument --d-model: must be >= 1"),
    ("tiny_gpt", ["--layers", "0"], "argument --layers: must be >= 1"),
    ("tiny_gpt", ["--heads", "3"], "argument --heads: must divide --d-model 32"),
    ("tiny_gpt", ["--lr", "nan"], "argument --lr: must be a finite float > 0"),
    ("tiny_gpt", ["--seed", "-1"], "argument --seed: must be in [0, 2**63)"),
    ("tiny_gpt", ["--n", "5"], "argument --n: nmsparse option n=5 is invalid"),
    ("tiny_gpt", ["--sparsity-seed", "-1"], "argument --sparsity-seed: nmsparse option seed=-1 is invalid"),
    (
        "tiny_gpt",
        ["--dense", "--n", "1", "--sparsity-seed", "3"],
        "argument --dense: the dense baseline takes no nmsparse options, got --n, --inner, --sparsity-seed",
    ),
    ("tiny_gpt", ["--dense", "--compare"], "argument --compare: not allowed with argument --dense"),
    ("tiny_gpt", ["--perm-interval", "0"], "argument --perm-interval: nmsparse option perm_interval=0 is invalid"),
    ("tiny_gpt", ["--include", "("], "argument --include: nmsparse option include='(' is invalid"),
    (
        "tiny_gpt",
        ["--n", "1", "--m", "8", "--structure-decay", "--steps", "3"],
        "argument --steps: nmsparse option total_steps=3",
    ),
    ("quickstart", ["--steps", "0"], "argument --steps: must be >= 1"),
    ("quickstart", ["--steps", "-1"], "argument --steps: must be >= 1"),
    ("quickstart", ["--inner", "eager"], "argument --inner: invalid choice: 'eager'"),
    ("cnn_digits", ["--epochs", "0"], "argument --epochs: must be >= 1"),
    ("cnn_digits", ["--epochs", "-1"], "argument --epochs: must be >= 1"),
    ("cnn_digits", ["--width", "0"], "argument --width: must be >= 1"),
    ("cnn_digits", ["--seed", "-1"], "argument --seed: must be in [0, 2**32)"),
    ("cnn_digits", ["--n", "5"], "argument --n: nmsparse option n=5 is invalid"),
    ("cnn_digits", ["--m", "64"], "argument --m: nmsparse option m=64 is invalid"),
    (
        "cnn_digits",
        ["--dense", "--grad-prune", "mvue24"],
        "argument --dense: the dense baseline takes no nmsparse options, got --grad-prune",
    ),
    ("study", ["--steps", "0"], "argument --steps: must be >= 1"),
    ("study", ["--epochs", "0"], "argument --epochs: must be >= 1"),
    ("study", ["--smoke", "--d-model", "30"], "argument --d-model: must be a multiple of 4"),
    ("study", ["--layers", "0"], "argument --layers: must be >= 1"),
    ("study", ["--seeds", "0", "-1"], "argument --seeds: each must be in [0, 2**32)"),
    ("study", ["--seeds", "1", "0", "1"], "argument --seeds: each at most once, got 1 more than once"),
    ("study", ["--recipes", "dense", "2:4 bimask", "dense"], "argument --recipes: each at most once, got dense"),
    ("study", ["--steps", "3"], "argument --recipes: '1:8 bimask + structure decay' cannot run with --steps 3"),
    ("study", ["--out", __file__], f"argument --out: {__file__} is not a directory"),
    ("study", ["--out", f"{__file__}/report"], f"argument --out: {__file__} is not a directory"),
    ("study", ["--out", "/proc/study"], "argument --out: cannot write in /proc"),
]


@pytest.mark.parametrize(("script", "argv", "message"), BAD_FLAGS)
def test_bad_flags_are_usage_errors(script, argv, message, capsys, tmp_path):
    """A bad value is a one-line usage error naming the flag (exit code 2) before any work starts."""
    base = {"tiny_gpt": TINY_GPT, "cnn_digits": ["--quiet"], "study": ["--out", str(tmp_path)], "quickstart": []}[
        script
    ]
    with pytest.raises(SystemExit) as exit_info:
        _load(script).main([*base, *argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"error: {message}" in captured.err
    assert not any(tmp_path.iterdir())
