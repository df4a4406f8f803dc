"""The training loop's order of work: on CUDA it queues meta-step t + 1 before it reads
step t's numbers (``imaml.train.reads_one_step_behind``). These tests run the CPU both
ways and check that the order changes nothing: the same parameters, optimiser state, log
and checkpoints, the same errors at the same steps, and no non-finite parameter kept."""

import json

import pytest
import torch
from test_train import sinusoid

import imaml.train as tr
from imaml.algorithms import TaskBatch, make_algorithm
from imaml.checkpoint import load_checkpoint
from imaml.data import make_task_families
from imaml.fast import MetaStep
from imaml.train import TASK_STREAM, meta_train


@pytest.fixture(params=[False, True], ids=["in-order", "one-behind"])
def behind(request, monkeypatch):
    monkeypatch.setattr(tr, "reads_one_step_behind", lambda device: request.param)
    return request.param


def log_of(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "step_time"} for x in lines]


def test_reading_one_step_behind_changes_nothing(tmp_path, monkeypatch):
    runs = {}
    for behind in (False, True):
        monkeypatch.setattr(tr, "reads_one_step_behind", lambda device, b=behind: b)
        out = tmp_path / str(behind)
        s = meta_train(sinusoid(checkpoint_every=2), out, progress=False, final_test=False)
        assert s["step"] == 6 and s["stopped_by"] is None
        runs[behind] = out
    a, b = (load_checkpoint(runs[x] / "last.pt") for x in (False, True))
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert torch.equal(a["rng"]["tasks"], b["rng"]["tasks"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert log_of(runs[False]) == log_of(runs[True])
    assert [r["step"] for r in log_of(runs[True]) if r["kind"] == "val"] == [3, 6]


NICHOL = dict(algo="reptile", outer_optim="sgd", outer_lr=0.5, outer_lr_final=0.0, decay_steps=6)


@pytest.mark.parametrize(
    ("train_shots", "outer"), [(None, {}), (7, {}), (None, NICHOL)], ids=["K", "train7", "sgd"]
)
def test_training_equals_a_hand_written_outer_loop(tmp_path, behind, train_shots, outer):
    """Algorithm 1 written out: sample, meta-gradient, Adam; the loop must give exactly it.
    With ``train_shots`` the training tasks have that many support examples, the others K.
    With ``outer_optim`` sgd and ``outer_lr_final``: plain steps, lr decayed linearly."""
    cfg = sinusoid(meta_steps=4, val_tasks=0, train_shots=train_shots, **outer)
    meta_train(cfg, tmp_path / "r", progress=False, final_test=False)
    fams, _ = make_task_families(cfg, progress=False)
    gen = torch.Generator().manual_seed(0)
    shots = {k: fams[k].sample(2, generator=gen).support_x.shape[1] for k in fams}
    assert shots == {"train": train_shots or cfg.k_shot, "val": cfg.k_shot, "test": cfg.k_shot}
    model = fams["train"].make_model(torch.Generator().manual_seed(cfg.seed))
    alg = make_algorithm(cfg.algo, model=model, loss=fams["train"].loss, **cfg.algorithm_kwargs())
    params = alg.meta_parameters(dict(model.named_parameters()))
    opt = torch.optim.Adam(params.values(), lr=cfg.outer_lr, eps=cfg.adam_eps)
    step, gen = MetaStep(alg), torch.Generator().manual_seed(cfg.seed + TASK_STREAM)
    after = []
    for t in range(cfg.meta_steps):
        grads, _ = step(params, fams["train"].sample(cfg.meta_batch, generator=gen))
        with torch.no_grad():
            for k, p in params.items():
                if outer:  # θ ← θ − ε_t g, ε_t from 0.5 at t = 0 to 0 at t = 6
                    p.add_(grads[k], alpha=-(0.5 + t / 6 * (0.0 - 0.5)))
                else:
                    p.grad = grads[k]
        if not outer:
            opt.step()
        after.append({k: p.detach().clone() for k, p in params.items()})
    saved = load_checkpoint(tmp_path / "r" / "last.pt")["params"]
    assert all(torch.equal(saved[k], after[-1][k]) for k in saved)
    assert not all(torch.equal(saved[k], after[-2][k]) for k in saved)  # one step fewer


@pytest.mark.parametrize(
    ("stop", "kw", "at", "outer"),
    [
        ("step limit", {"max_steps_this_run": 3}, 3, {}),
        ("time budget", {"time_budget_s": 0.0}, 1, {}),
        ("step limit", {"max_steps_this_run": 3}, 3, {**NICHOL, "inner_batch": 4}),
    ],
)
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, behind, stop, kw, at, outer):
    """Stopping drops a step launched ahead: the checkpoint and its sampler state are those
    of the last step read, so the resumed run still equals the uninterrupted one (with a
    decaying outer learning rate and mini-batched inner steps too)."""
    cfg = sinusoid(meta_steps=7, checkpoint_every=100, **outer)
    meta_train(cfg, tmp_path / "a", progress=False, final_test=False)
    s = meta_train(cfg, tmp_path / "b", progress=False, final_test=False, **kw)
    assert s["stopped_by"] == stop and s["step"] == at
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == at
    meta_train(None, tmp_path / "b", resume=True, progress=False, final_test=False)
    a, b = (load_checkpoint(tmp_path / x / "last.pt") for x in "ab")
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert log_of(tmp_path / "a") == log_of(tmp_path / "b")


def test_non_finite_outer_update_is_refused_at_its_step(tmp_path, behind, monkeypatch):
    class BreaksAtStep2(torch.optim.Adam):
        def step(self, closure=None):
            super().step(closure)
            if self.state[self.param_groups[0]["params"][0]]["step"] == 2:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    monkeypatch.setattr(torch.optim, "Adam", BreaksAtStep2)
    with pytest.raises(ValueError, match="step 2: the outer update made parameters non-finite"):
        meta_train(sinusoid(checkpoint_every=1), tmp_path / "r", progress=False)
    ck = load_checkpoint(tmp_path / "r" / "last.pt")  # the last good step, finite
    assert ck["step"] == 1 and all(torch.isfinite(v).all() for v in ck["params"].values())


def test_a_batch_with_every_task_skipped_is_refused(tmp_path, behind, monkeypatch):
    real = tr.make_task_families

    def poisoned(cfg, progress=True):
        fams, info = real(cfg, progress=progress)
        train = fams["train"]

        class Bad:
            loss, metric, make_model = train.loss, train.metric, train.make_model

            def sample(self, n, *, generator, dtype=torch.float32):
                b = train.sample(n, generator=generator, dtype=dtype)
                return TaskBatch(torch.full_like(b.support_x, float("nan")), *b[1:])

        return {**fams, "train": Bad()}, info

    monkeypatch.setattr(tr, "make_task_families", poisoned)
    with pytest.raises(ValueError, match="every task of the batch gave a non-finite"):
        meta_train(sinusoid(checkpoint_every=1), tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "last.pt").exists()


def test_checkpoints_hold_finite_parameters_when_the_inner_loop_explodes(tmp_path, behind):
    cfg = sinusoid(meta_steps=3, inner_lr=1e6, inner_steps=30, checkpoint_every=1)
    with pytest.raises(ValueError, match="non-finite"):
        meta_train(cfg, tmp_path / "r", progress=False)
    for f in (tmp_path / "r").glob("*.pt"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(f)["params"].values())


def test_a_training_step_reads_no_device_value_but_the_optimisers(tmp_path, behind):
    """Per meta-step the loop reads nothing from the device on the host (its numbers come
    in one copy, awaited one step late on CUDA): the only host reads are Adam's own, one
    step counter per parameter tensor. (The loop used to add two: the finiteness check and
    the all-skipped check.)"""
    from test_cuda_graph import RecordSyncs

    counts = {}
    for n in (4, 7):
        cfg = sinusoid(meta_steps=n, val_tasks=0, checkpoint_every=100)
        with RecordSyncs() as rec:
            meta_train(cfg, tmp_path / str(n), progress=False, final_test=False)
        counts[n] = len(rec.seen)
    params = load_checkpoint(tmp_path / "4" / "last.pt")["params"].values()
    adam = torch.optim.Adam([torch.nn.Parameter(p) for p in params])
    for p in adam.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with RecordSyncs() as rec:
        for _ in range(3):
            adam.step()
    assert counts[7] - counts[4] == len(rec.seen) > 0


def test_the_decay_horizon_is_fixed_when_the_run_is_created():
    """``decay_steps`` defaults to the schedule the run is created with and stays when a
    resume extends ``meta_steps`` (a runtime field), so the learning rates do not move."""
    cfg = sinusoid(meta_steps=8, **{k: v for k, v in NICHOL.items() if k != "decay_steps"})
    assert cfg.decay_steps == 8 and cfg.replace(meta_steps=20).decay_steps == 8
    assert [cfg.outer_lr_at(t) for t in (0, 4, 8, 12)] == [0.5, 0.25, 0.0, 0.0]
    assert sinusoid().outer_lr_at(5) == sinusoid().outer_lr  # constant without a final lr
