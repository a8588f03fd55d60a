"""Tiny-size smoke tests of every example: they run end to end and report what they promise."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

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
    """examples/quickstart.py: finite, falling loss."""
    losses = _load("quickstart").main(steps=12, inner="aot_eager")
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_tiny_gpt_compare(capsys):
    """--compare trains dense and sparse on stdlib text and prints both losses and the table."""
    runs = _load("tiny_gpt").main([*TINY_GPT, "--compare", "--n", "1", "--m", "4", "--grad-prune", "mvue24"])
    assert set(runs) == {"dense", "nmsparse"}
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(128) + 1 for r in runs.values())
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


def test_cnn_digits_runs(capsys):
    result = _load("cnn_digits").main(["--epochs", "1", "--width", "8", "--quiet", "--inner", "aot_eager"])
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert "C=1 not divisible by m=4" in capsys.readouterr().out


def test_study_smoke(tmp_path):
    """The study writes results.md with every requested row, the claims section and both plots."""
    recipes = ["dense", "2:4 bimask", "2:4 transposable"]
    path = _load("study").main(["--smoke", "--steps", "4", "--epochs", "1", "--seeds", "0", "--out", str(tmp_path),
                                "--inner", "aot_eager", "--recipes", *recipes])  # fmt: skip
    text = path.read_text()
    for name in recipes:
        assert f"| {name} |" in text
    assert "Bi-Mask matches or beats transposable masks at 2:4" in text
    assert (tmp_path / "study_val_curves.png").stat().st_size > 0
    assert (tmp_path / "study_kept_fraction.png").stat().st_size > 0
