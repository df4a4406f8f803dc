"""benchmarks/table2.py: cells that survive short allocations, packed and unpacked exactly."""

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import REAL_DATA, needs_real

ROOT = Path(__file__).resolve().parents[1]
CELL = "omniglot-5w1s-fomaml"


@pytest.fixture
def t2(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("table2", ROOT / "benchmarks" / "table2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "STEPS_TARGET", 4)
    tiny = dict(meta_batch=2, inner_steps=1, val_tasks=0, checkpoint_every=1, data_dir=REAL_DATA)
    monkeypatch.setattr(module, "OVERRIDES", tiny)
    monkeypatch.setattr(module, "TEST_TASKS", 4)
    return module


def params(folder):
    return torch.load(folder / "last.pt", weights_only=False)["params"]


def train_to(t2, cell, step):
    from imaml.train import meta_train

    folder = t2.RUNS / cell
    cfg = t2.cell_config(cell).replace(meta_steps=step)
    meta_train(cfg, folder, resume=(folder / "last.pt").exists(), progress=False, final_test=False)


def test_the_cells_and_their_order(t2):
    names = t2.cells()
    assert len(names) == 20 and len(set(names)) == 20
    one_shot = ("imaml-gd", "maml", "fomaml", "reptile", "imaml-hf")
    assert names[:5] == [f"omniglot-5w1s-{a}" for a in one_shot]
    assert names[5:10] == [f"omniglot-20w1s-{a}" for a in one_shot]
    assert all("imaml" in c for c in names[10:14]) and not any("imaml" in c for c in names[14:])
    with pytest.raises(t2.CellError, match="unknown cell"):
        t2.split_cell("omniglot-5w1s-protonet")


def test_a_row_names_every_machine_its_cell_ran_on(t2):
    folder = t2.RUNS / CELL
    folder.mkdir(parents=True)
    runs = [{"cpu_model": "Intel Xeon"}, {"cpu_model": "AMD EPYC"}, {"cpu_model": "Intel Xeon"}]
    (folder / "machine.json").write_text(json.dumps({"runs": runs}))
    assert t2.row(CELL)["device"] == "Intel Xeon + AMD EPYC"
    assert t2.row("omniglot-5w1s-maml")["device"] is None  # no folder yet


def test_status_shows_each_started_cells_validation_by_step(t2):
    def write(cell, records):
        (t2.RUNS / cell).mkdir(parents=True)
        lines = [json.dumps(r) for r in records]
        (t2.RUNS / cell / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    val = lambda step, acc: {"kind": "val", "step": step, "mean": acc, "ci95": 0.02, "tasks": 200}
    train = {"kind": "train", "step": 1, "step_time": 0.5}
    write(CELL, [train, val(2, 0.9), train, val(4, 0.95)])
    write("omniglot-20w1s-maml", [train, val(2, 0.8)])
    write("omniglot-5w1s-maml", [train])  # started, nothing validated yet
    t2.main(["status"])
    table = json.loads((t2.RESULTS / "table2.json").read_text())
    assert table["validation"] == {
        CELL: [
            {"step": 2, "mean": 0.9, "ci95": 0.02, "tasks": 200},
            {"step": 4, "mean": 0.95, "ci95": 0.02, "tasks": 200},
        ],
        "omniglot-20w1s-maml": [{"step": 2, "mean": 0.8, "ci95": 0.02, "tasks": 200}],
    }
    md = (t2.RESULTS / "table2.md").read_text()
    assert "| cell | 2 | 4 |" in md and "200 tasks" in md and "±2.0" in md
    assert f"| {CELL} | 90.0 | 95.0 |" in md and "| omniglot-20w1s-maml | 80.0 | – |" in md
    assert "| omniglot-5w1s-maml |" not in md
    # status folded each log into its .gz, which the next status reads the same
    assert all(not (t2.RUNS / c / "metrics.jsonl").exists() for c in table["validation"])
    assert (t2.RUNS / CELL / "metrics.jsonl.gz").exists()
    t2.main(["status"])
    assert json.loads((t2.RESULTS / "table2.json").read_text()) == table


@needs_real
def test_pack_unpack_round_trip_and_an_exact_resume(t2, tmp_path):
    train_to(t2, CELL, 2)
    t2.compress_logs([CELL])  # as `run` does before packing
    (archive,) = t2.pack([CELL], tmp_path / "out")
    before = {
        f: (t2.RUNS / CELL / f).read_bytes() for f in ("last.pt", "metrics.jsonl.gz", "config.json")
    }
    import shutil

    shutil.rmtree(t2.RUNS / CELL)
    assert t2.unpack(archive) == [CELL]
    assert all((t2.RUNS / CELL / f).read_bytes() == b for f, b in before.items())
    t2.train_cell(CELL, deadline=1e12, device="cpu")  # resumes from the unpacked checkpoint
    assert t2.steps_done(t2.RUNS / CELL) == 4 and (t2.RUNS / CELL / "eval.json").exists()
    resumed = params(t2.RUNS / CELL)
    straight_runs = tmp_path / "straight"
    t2.RUNS = straight_runs
    train_to(t2, CELL, 4)
    straight = params(straight_runs / CELL)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    from imaml.plot import read_metrics

    strip = lambda rs: [{k: v for k, v in r.items() if k != "step_time"} for r in rs]
    logs = [read_metrics(runs / CELL)[0] for runs in (tmp_path / "runs", straight_runs)]
    assert [r["step"] for r in logs[0]] == [1, 2, 3, 4] and strip(logs[0]) == strip(logs[1])


@needs_real
def test_the_picker_skips_finished_cells(t2):
    t2.train_cell(CELL, deadline=1e12, device="cpu")
    assert t2.steps_done(t2.RUNS / CELL) == 4
    todo = t2.pending(None)
    assert CELL not in todo and "omniglot-5w1s-maml" in todo
    t2.main(["status"])
    table = json.loads((t2.RESULTS / "table2.json").read_text())
    row = next(c for c in table["cells"] if f"{c['setting']}-{c['algo']}" == CELL)
    assert row["steps_done"] == 4 and row["test_tasks"] == 4 and row["disjoint_test_classes"]
    assert set(row) >= {
        "setting",
        "algo",
        "steps_done",
        "steps_target",
        "test_acc",
        "ci95",
        "test_tasks",
        "disjoint_test_classes",
        "paper_acc",
        "device",
        "s_per_step",
    }
    assert (t2.RESULTS / "table2.md").read_text().count("| omniglot-") == 20


@needs_real
def test_a_change_of_evaluation_re_evaluates_a_finished_cell_without_training(t2, monkeypatch):
    t2.train_cell(CELL, deadline=1e12, device="cpu")
    before = (t2.RUNS / CELL / "last.pt").read_bytes()
    assert t2.row(CELL)["test_acc"] is not None and CELL not in t2.pending(None)
    base = t2.OVERRIDES
    monkeypatch.setattr(t2, "OVERRIDES", {**base, "eval_inner_lr": 0.03})
    assert t2.row(CELL)["test_acc"] is None and CELL in t2.pending(None)  # stale, not shown
    t2.main(["status"])
    assert "| fomaml | – (to evaluate: `run`) | 4 / 4 |" in (t2.RESULTS / "table2.md").read_text()
    t2.train_cell(CELL, deadline=1e12, device="cpu")
    ev = json.loads((t2.RUNS / CELL / "eval.json").read_text())
    assert ev["eval_inner"]["inner_lr"] == 0.03 and ev["config"]["eval_inner_lr"] == 0.03
    assert (t2.RUNS / CELL / "last.pt").read_bytes() == before  # evaluated, not trained
    assert t2.row(CELL)["test_acc"] == ev["mean"] and CELL not in t2.pending(None)
    monkeypatch.setattr(t2, "OVERRIDES", base)  # unset again: as the cell's own config.json
    assert CELL in t2.pending(None)
    t2.train_cell(CELL, deadline=1e12, device="cpu")
    ev = json.loads((t2.RUNS / CELL / "eval.json").read_text())
    assert ev["eval_inner"]["inner_lr"] == 0.1 and CELL not in t2.pending(None)


@needs_real
def test_a_folder_whose_config_is_not_its_cell_is_refused(t2, capsys):
    train_to(t2, CELL, 1)
    other = t2.RUNS / "omniglot-5w1s-maml"
    (t2.RUNS / CELL).rename(other)  # a fomaml run in the maml cell
    code = t2.main(
        [
            "run",
            "--minutes",
            "1",
            "--out",
            str(t2.RUNS.parent / "o"),
            "--cells",
            "omniglot-5w1s-maml",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "does not hold cell omniglot-5w1s-maml" in err


@needs_real
def test_a_corrupt_or_truncated_archive_leaves_the_state_untouched(t2, tmp_path, capsys):
    train_to(t2, CELL, 1)
    (archive,) = t2.pack([CELL], tmp_path / "out")
    train_to(t2, CELL, 2)
    state = (t2.RUNS / CELL / "last.pt").read_bytes()
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    assert t2.main(["unpack", str(cut)]) == 2
    assert "not a complete table2 archive" in capsys.readouterr().err
    # a member whose bytes do not match the manifest
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            blob = src.extractfile(m).read()
            if m.name.endswith("metrics.jsonl"):
                blob = blob.replace(b"1", b"2")
            m.size = len(blob)
            import io

            dst.addfile(m, io.BytesIO(blob))
    assert t2.main(["unpack", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    # an older archive never moves a cell back
    assert t2.main(["unpack", str(archive)]) == 2
    assert (t2.RUNS / CELL / "last.pt").read_bytes() == state
    assert not [p for p in t2.RUNS.iterdir() if p.name.startswith(".")]
