"""benchmarks/eval_settings.py: a grid of evaluation inner loops over finished runs."""

import importlib.util
import json
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
