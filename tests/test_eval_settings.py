"""benchmarks/eval_settings.py: a grid of evaluation inner loops over finished runs."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from imaml.config import from_preset
from imaml.train import evaluate_run, meta_train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def es(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "eval_settings", ROOT / "benchmarks" / "eval_settings.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path / "out")
    return module


def test_each_setting_scores_the_same_tasks_and_the_runs_eval_stays(es, tmp_path):
    cfg = from_preset("sinusoid", meta_steps=2, meta_batch=2, val_tasks=0, threads=1)
    run = tmp_path / "r"
    meta_train(cfg, run, progress=False, final_test=False)
    argv = ["t", str(run), "--steps", "1,3", "--lr", "0.01,0.02", "--tasks", "6", "--eval-lam", "0"]
    assert es.main(argv) == 0
    assert not (run / "eval.json").exists()
    out = json.loads((tmp_path / "out" / "eval_settings_t.json").read_text())
    assert [(r["inner_steps"], r["inner_lr"]) for r in out["records"]] == [
        (1, 0.01),
        (1, 0.02),
        (3, 0.01),
        (3, 0.02),
    ]
    ref = evaluate_run(
        run,
        tasks=6,
        split="val",
        checkpoint="last",
        seed=0,
        eval_inner_steps=3,
        eval_inner_lr=0.02,
        eval_lam=0.0,
        write=False,
    )
    assert out["records"][3]["mean"] == ref["mean"]
    assert out["records"][3]["eval_inner"]["inner_steps"] == 3
    assert out["records"][3]["eval_inner"]["lam"] == 0.0 and cfg.lam_value > 0
    md = (tmp_path / "out" / "eval_settings_t.md").read_text()
    assert "| r | 3 |" in md and "eval_settings.py t" in md and "(λ = 0)" in md


@pytest.mark.parametrize(
    "bad", [["--steps", "0"], ["--lr", "x"], ["--lr", ""], ["--tasks", "0"], ["--eval-lam", "-1"]]
)
def test_bad_grids_and_folders_are_refused(es, tmp_path, bad):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="error: (expected|--tasks|--eval-lam)"):
        es.main(["t", str(run), *bad])
    with pytest.raises(SystemExit, match="not a run folder"):
        es.main(["t", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="has no last.pt to evaluate"):
        es.main(["t", str(run)])


def test_a_run_still_training_is_scored_at_one_step(es, tmp_path, monkeypatch):
    """A run that rewrites last.pt during the grid must not mix two θ in one table."""
    runs = {}
    for steps in (2, 3):
        cfg = from_preset("sinusoid", meta_steps=steps, meta_batch=2, val_tasks=0, threads=1)
        runs[steps] = tmp_path / f"r{steps}"
        meta_train(cfg, runs[steps], progress=False, final_test=False)
    live = runs[2]
    kept = tmp_path / "kept"
    kept.mkdir()
    shutil.copy2(live / "last.pt", kept / "last.pt")
    real = es.evaluate_run

    def evaluate_then_train(*args, **kwargs):
        out = real(*args, **kwargs)
        shutil.copy2(runs[3] / "last.pt", live / "last.pt")  # the run moved on meanwhile
        return out

    monkeypatch.setattr(es, "evaluate_run", evaluate_then_train)
    assert es.main(["t", str(live), "--steps", "1,2", "--lr", "0.01", "--tasks", "4"]) == 0
    records = json.loads((tmp_path / "out" / "eval_settings_t.json").read_text())["records"]
    assert [r["checkpoint_step"] for r in records] == [2, 2]
    assert records[0]["run"] == "r2"
    ref = real(
        kept,
        tasks=4,
        split="val",
        checkpoint="last",
        seed=0,
        eval_inner_steps=2,
        eval_inner_lr=0.01,
        write=False,
    )
    assert records[1]["mean"] == ref["mean"]
