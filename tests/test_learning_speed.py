"""benchmarks/learning_speed.py: runs that resume exactly and steps scored once."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import needs_real

ROOT = Path(__file__).resolve().parents[1]


def load_study(runs: Path, monkeypatch):
    monkeypatch.setenv("LEARNING_SPEED_RUNS", str(runs))
    spec = importlib.util.spec_from_file_location(
        "learning_speed", ROOT / "benchmarks" / "learning_speed.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configurations_are_valid_and_only_the_preset_is_default(tmp_path, monkeypatch):
    study = load_study(tmp_path, monkeypatch)
    defaults = [n for n in study.CONFIGS if study.is_default(n)]
    assert len(defaults) == 1  # exactly one configuration is what the preset trains
    for name in study.CONFIGS:
        study.config_for(name, 0)  # each a valid Config


def test_summary_averages_only_scored_steps():
    spec = importlib.util.spec_from_file_location("ls", ROOT / "benchmarks" / "learning_speed.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    rec = lambda seed, step, acc: {
        "name": "a",
        "seed": seed,
        "step": step,
        "val_acc": acc,
        "val_acc_own": acc,
        "s_per_step": 1.0,
        "is_default": False,
    }
    rows = study.summarise([rec(0, 250, 0.5), rec(1, 250, 0.7), rec(0, 500, 0.9)])
    by_step = {r["step"]: r for r in rows}
    assert by_step[250]["seeds"] == [0, 1] and abs(by_step[250]["val_acc"] - 0.6) < 1e-12
    assert by_step[500]["seeds"] == [0] and by_step[500]["val_acc"] == 0.9


@needs_real
def test_a_killed_run_resumes_exactly_and_rescores(tmp_path, monkeypatch):
    study = load_study(tmp_path, monkeypatch)
    args = ["--val-tasks", "8"]
    study.main(["one", "fomaml", "0", "--steps", "1", *args])
    study.main(["one", "fomaml", "0", "--steps", "1,2", *args])  # resumed from step 1
    folder = tmp_path / "fomaml-s0"
    points = (folder / "points.jsonl").read_text().splitlines()
    assert [json.loads(p)["step"] for p in points] == [1, 2]
    # killed while scoring step 2: its line is cut; the next call scores it again
    (folder / "points.jsonl").write_text(points[0] + "\n" + points[1][:20])
    study.main(["one", "fomaml", "0", "--steps", "1,2", *args])
    again = [json.loads(p) for p in (folder / "points.jsonl").read_text().splitlines()[-1:]]
    assert again[0]["step"] == 2 and again[0]["val_acc"] == json.loads(points[1])["val_acc"]
    # one uninterrupted run to step 2 has bit-identical parameters
    monkeypatch.setattr(study, "RUNS", tmp_path / "straight")
    study.main(["one", "fomaml", "0", "--steps", "2", *args])
    a = torch.load(folder / "last.pt", weights_only=False)["params"]
    b = torch.load(tmp_path / "straight" / "fomaml-s0" / "last.pt", weights_only=False)["params"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_configuration_stops_with_its_name(tmp_path, monkeypatch):
    study = load_study(tmp_path, monkeypatch)
    with pytest.raises(SystemExit, match="unknown configuration 'nope'"):
        study.main(["run", "--configs", "fomaml,nope", "--steps", "1"])


@needs_real
def test_time_records_each_configuration_and_report_uses_it(tmp_path, monkeypatch):
    study = load_study(tmp_path, monkeypatch)
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    study.main(["time", "--configs", "fomaml,imaml-paper-ggn", "--repeats", "1"])
    times = json.loads((tmp_path / "results" / "learning_speed_times.json").read_text())
    assert set(times["s_per_step"]) == {"fomaml", "imaml-paper-ggn"}
    assert all(t > 0 for t in times["s_per_step"].values())
    # a later timing adds its measurement; the others' times stay, the latest is read
    study.main(["time", "--configs", "fomaml", "--repeats", "1"])
    times = json.loads((tmp_path / "results" / "learning_speed_times.json").read_text())
    assert [list(m["s_per_step"]) for m in times["measurements"]] == [
        ["fomaml", "imaml-paper-ggn"],
        ["fomaml"],
    ]
    assert times["s_per_step"]["fomaml"] == times["measurements"][1]["s_per_step"]["fomaml"]
    assert "imaml-paper-ggn" in times["s_per_step"]
    study.main(["one", "fomaml", "0", "--steps", "1", "--val-tasks", "4"])
    study.main(["report"])
    report = json.loads((tmp_path / "results" / "learning_speed.json").read_text())
    (row,) = report["summary"]
    assert row["s_per_step_quiet"] == times["s_per_step"]["fomaml"]
    assert report["records"][0]["val_tasks"] == 4
    assert set(report["records"][0]) == set(study.RECORD_KEYS)  # the contract, exactly
