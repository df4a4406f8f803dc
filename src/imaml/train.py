"""meta_train(cfg, out_dir): the outer loop of Algorithm 1, top to bottom.

Files in the run folder:
- ``config.json``: the full configuration;
- ``metrics.jsonl``: one JSON object per logged step (``"kind": "train"``) and per
  validation (``"kind": "val"``), after any history folded into ``metrics.jsonl.gz``
  (``run_folder.compress_metrics``; read both with ``plot.read_metrics``);
- ``last.pt``: everything needed to resume exactly (parameters, Adam state, step, the
  task-sampling RNG state, the data split); ``best.pt``: parameters with the best
  validation score so far;
- ``learning_curve.png``; ``eval.json`` after the final test evaluation.

On CUDA the host queues meta-step t + 1 before it waits for step t's numbers (one step
ahead), so sampling, logging and the copy of the statistics overlap the device's work;
everything decided from step t's numbers (the finiteness check, the log, validation,
checkpoints, stopping) still happens before step t + 1's outer update. On the CPU
nothing overlaps, and each step is read before the next is sampled.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .algorithms import TaskBatch, make_algorithm
from .checkpoint import FORMAT, load_checkpoint, save_checkpoint
from .config import RUNTIME_FIELDS, Config, ConfigError
from .data import make_task_families
from .evaluate import evaluate, evaluate_run
from .fast import MetaStep, auto_compile, auto_hvp_mode
from .machine import machine_info
from .run_folder import RunLock, StopFlag, prepare_folder, record_machine, trim_metrics
from .runtime import TASK_STREAM, TEST_STREAM, VAL_STREAM, resolve_device, setup_runtime

__all__ = ["TASK_STREAM", "TEST_STREAM", "VAL_STREAM", "evaluate_run", "meta_train"]

HIGHER_IS_BETTER = {"accuracy": True, "mse": False, "half_sse": False}
SKIP_WINDOW = 20  # meta-steps over which --max-skip-frac is judged


def summary_tensor(stats: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """Means over the kept tasks of a meta-batch, maxima of the accuracy diagnostics, and the
    fraction of tasks skipped for non-finite values: their names, and their values as one
    float64 tensor on the statistics' device, computed there (no host-device
    synchronisation) so that the host reads them in one transfer."""
    first = next(iter(stats.values()))
    skipped = stats.get("skipped", torch.zeros_like(first, dtype=torch.bool))
    kept = ~skipped
    n_kept = kept.sum()
    names, values = ["skipped_frac"], [skipped.double().mean()]
    for k, v in stats.items():
        if k == "skipped":
            continue
        v = v.detach().double()  # over the kept tasks (NaN where none is kept)
        names.append("negative_curvature_frac" if k == "negative_curvature" else k)
        values.append(torch.where(kept, v, 0.0).sum() / n_kept)
        if k in ("inner_grad_norm", "solver_residual", "inner_iterations"):
            vmax = torch.where(kept, v, -torch.inf).max()
            names.append(k + "_max")
            values.append(torch.where(n_kept > 0, vmax, torch.nan))
    return names, torch.stack(values)


def _to_host(values: torch.Tensor) -> Callable[[], list[float]]:
    """Start copying ``values`` to the host; the returned function waits for the copy and
    gives the numbers. On CUDA the copy is asynchronous (pinned memory and an event), so
    the host can queue the next meta-step before it waits for this one's numbers."""
    if not values.is_cuda:
        return values.tolist
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> list[float]:
        done.synchronize()
        return host.tolist()

    return read


def reads_one_step_behind(device: torch.device) -> bool:
    """Whether training queues meta-step t + 1 before it reads step t's numbers: on CUDA,
    where the device runs ahead of the host (a function, so tests can run the CPU that way)."""
    return device.type == "cuda"


def meta_train(
    cfg: Config | None,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    time_budget_s: float | None = None,
    max_steps_this_run: int | None = None,
    final_test: bool = True,
    tensorboard: bool = False,
) -> dict:
    """Meta-train per ``cfg`` into ``out_dir``; returns a summary (and the test result if run).

    ``resume=True`` continues from ``out_dir/last.pt`` with the saved config (``cfg`` may
    be None; if given, only its ``RUNTIME_FIELDS`` are taken, e.g. ``meta_steps`` to extend
    the run). The run stops early, with a checkpoint, after
    ``time_budget_s`` seconds, ``max_steps_this_run`` steps, or on SIGINT/SIGTERM.
    A second live run into the same folder is refused (``RunLock``).
    """
    out = Path(out_dir)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out / "last.pt")
        saved = Config.from_dict(ckpt["config"])
        cfg = (
            saved if cfg is None else saved.replace(**{k: getattr(cfg, k) for k in RUNTIME_FIELDS})
        )
    cfg = cfg.replace(device=distributed.device_for(cfg.device))
    d = distributed.from_env(resolve_device(cfg.device), timeout_s=cfg.dist_timeout)
    lock, locked, ok = RunLock(out), False, False
    try:
        error = None
        if d.main:
            try:
                prepare_folder(out, resume=resume)
                lock.acquire()
                locked = True
            except ValueError as e:
                error = str(e)
        error = d.broadcast(error)
        if error is not None:
            raise ValueError(error)
        if d.enabled and cfg.meta_batch < d.world:
            raise ValueError(
                f"meta_batch ({cfg.meta_batch}) must be at least the number of processes ({d.world})"
            )
        run = _Run.build(cfg, out, ckpt, d, progress=progress and d.main)
        summary = run.train(
            time_budget_s=time_budget_s,
            max_steps_this_run=max_steps_this_run,
            tensorboard=tensorboard and d.main,
        )
        if summary["stopped_by"] is None and final_test:
            d.barrier()  # best.pt is on disk for every rank
            summary["test"] = evaluate_run(out, progress=progress and d.main, shard=d)
        ok = True
        return summary
    finally:
        if locked:  # never remove a lock this process did not take
            lock.release()
        distributed.close(d, clean=ok)


@dataclass
class _Launched:
    """A meta-step whose meta-gradient is queued on the device; ``apply`` adds the outer
    update and starts copying the step's statistics to the host."""

    grads: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    rng: torch.Tensor  # the task sampler's state after this step's batch (for last.pt)
    t0: float
    before: dict[str, torch.Tensor] | None = None  # the parameters before the update
    names: list[str] | None = None
    read: Callable[[], list[float]] | None = None


@dataclass
class _Run:
    """Everything one training run holds: what is learned, how, and where it stands."""

    cfg: Config
    out: Path
    d: distributed.Dist
    progress: bool
    device: torch.device
    dtype: torch.dtype
    families: dict
    split_info: dict
    alg: object
    params: dict
    opt: torch.optim.Optimizer
    meta_step: MetaStep
    compile_mode: str
    task_gen: torch.Generator
    step: int = 0
    best: dict = field(default_factory=lambda: {"step": None, "mean": None})
    rng_now: torch.Tensor | None = None  # the task sampler's state after the last step read
    machine: dict = field(default_factory=dict)

    # -- set-up ------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: Config, out: Path, ckpt: dict | None, d, *, progress: bool) -> _Run:
        """The network, algorithm, optimiser and task sampler; restored from ``ckpt``."""
        device, dtype = setup_runtime(cfg)
        if cfg.cuda_graph == "on" and device.type != "cuda":
            raise ConfigError(f"cuda_graph on needs a CUDA device; this run is on {device}")
        families, split_info = make_task_families(cfg, progress=progress)
        model = families["train"].make_model(torch.Generator().manual_seed(cfg.seed))
        model = model.to(device=device, dtype=dtype)
        # CUDA graph replay where it applies; torch.compile when asked, or (auto) where it
        # pays over the schedule (the whole of it: a resumed run chooses as the
        # uninterrupted one)
        compile_mode = cfg.compile
        if compile_mode == "auto":
            compile_mode = auto_compile(cfg, device, steps=cfg.meta_steps, algo=cfg.algo)
        kwargs = cfg.algorithm_kwargs()
        if cfg.hvp_mode == "auto" and "hvp_mode" in kwargs:  # the products that suit the step
            kwargs["hvp_mode"] = auto_hvp_mode(device, compile_mode)
        alg = make_algorithm(cfg.algo, model=model, loss=families["train"].loss, **kwargs)
        params = alg.meta_parameters(dict(model.named_parameters()))  # with log λ if learned
        run = cls(
            cfg=cfg,
            out=out,
            d=d,
            progress=progress,
            device=device,
            dtype=dtype,
            families=families,
            split_info=split_info,
            alg=alg,
            params=params,
            opt=outer_optimizer(cfg, params),
            meta_step=MetaStep(
                alg, mode=cfg.cuda_graph, compile=compile_mode, fallback=cfg.compile == "auto"
            ),
            compile_mode=compile_mode,
            task_gen=torch.Generator().manual_seed(cfg.seed + TASK_STREAM),
        )
        if ckpt is not None:
            run.restore(ckpt)
        run.rng_now = run.task_gen.get_state()
        run.machine = {**machine_info(), "processes": d.world, "from_step": run.step}
        if d.main:  # rank 0 alone writes files
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            record_machine(out, run.machine)
        return run

    def restore(self, ckpt: dict) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(ckpt["params"][k])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.task_gen.set_state(ckpt["rng"]["tasks"])
        self.step, self.best = ckpt["step"], ckpt["best"]
        if self.d.main:
            trim_metrics(self.out, self.step)

    # -- checkpoints and validation ------------------------------------------------------
    def save(self, kind: str) -> None:
        """``last.pt`` (everything to resume) or ``best.pt`` (parameters); rank 0 only."""
        if not self.d.main:
            return
        s = {
            "format": FORMAT,
            "kind": kind,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "params": {k: v.detach().cpu() for k, v in self.params.items()},
            "split": self.split_info,
            "best": self.best,
            "torch": str(torch.__version__),
        }
        if kind == "last":
            s["optimizer"] = self.opt.state_dict()
            s["rng"] = {"tasks": self.rng_now}
        save_checkpoint(self.out / f"{kind}.pt", s)

    def validate(self) -> dict | None:
        """The validation score now (None without a validation split), best.pt kept."""
        cfg = self.cfg
        if self.families["val"] is None or cfg.val_tasks == 0:
            return None
        val = evaluate(
            self.alg,
            self.params,
            self.families["val"],
            num_tasks=cfg.val_tasks,
            generator=torch.Generator().manual_seed(cfg.seed + VAL_STREAM),
            batch_size=cfg.meta_batch,
            overrides=cfg.eval_overrides(),
            device=self.device,
            dtype=self.dtype,
            shard=self.d,
        )
        higher = HIGHER_IS_BETTER[self.families["train"].metric]
        old = self.best["mean"]
        if old is None or (val["mean"] > old if higher else val["mean"] < old):
            self.best = {"step": self.step, "mean": val["mean"], "ci95": val["ci95"]}
            self.save("best")
        return val

    # -- one meta-step ---------------------------------------------------------------------
    def launch(self) -> _Launched:
        """Sample a meta-batch and queue its meta-gradient (this rank's share of the tasks,
        averaged over all ranks). A batch whose tasks are all skipped is refused when its
        numbers are read (``check``)."""
        t0 = time.perf_counter()
        batch = self.families["train"].sample(
            self.cfg.meta_batch, generator=self.task_gen, dtype=self.dtype
        )
        rng = self.task_gen.get_state()
        if self.device.type == "cuda":  # from pinned memory: the copy does not wait
            batch = TaskBatch(*(t.pin_memory() for t in batch)).to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        grads, stats = self.meta_step(self.params, self.d.take(batch), allow_empty=True)
        grads = distributed.mean_over_ranks(self.d, grads, stats["skipped"])
        stats = distributed.gather_tasks(self.d, stats)
        return _Launched(grads, stats, rng, t0)

    def apply(self, s: _Launched) -> None:
        """The outer update, keeping the parameters before it; the statistics to the host."""
        for k, p in self.params.items():
            p.grad = s.grads.get(k)  # none for a frozen parameter
        s.before = {k: p.detach().clone() for k, p in self.params.items()}
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.outer_lr_at(self.step)
        self.opt.step()
        finite = torch.stack([torch.isfinite(p).all() for p in self.params.values()]).all()
        s.names, values = summary_tensor(s.stats)
        s.read = _to_host(torch.cat([values, finite.double()[None]]))

    def check(self, s: _Launched, record: dict, finite: bool) -> None:
        """Undo and refuse a step that made the parameters non-finite or skipped every task."""
        if finite and record["skipped_frac"] < 1.0:
            return
        with torch.no_grad():  # never keep (or save) non-finite parameters
            for k, p in self.params.items():
                p.copy_(s.before[k])
        if finite:
            self.alg.check_not_all_skipped(s.stats)  # raises, with the reason
        raise ValueError(
            f"step {self.step}: the outer update made parameters non-finite; "
            f"last good checkpoint: {self.out / 'last.pt'} (try a lower --outer-lr)"
        )

    def check_skips(self, window: list[float]) -> None:
        """Stop, with a checkpoint, when too many tasks were skipped over the last steps."""
        recent = window[-SKIP_WINDOW:]
        if len(recent) < SKIP_WINDOW or sum(recent) / SKIP_WINDOW <= self.cfg.max_skip_frac:
            return
        self.save("last")
        raise ValueError(
            f"step {self.step}: {100 * sum(recent) / SKIP_WINDOW:.0f}% of tasks over the last "
            f"{SKIP_WINDOW} meta-steps had a non-finite loss or meta-gradient (limit "
            f"--max-skip-frac {self.cfg.max_skip_frac}); lower --inner-lr or check the data. "
            f"Checkpoint: {self.out / 'last.pt'}"
        )

    def postfix(self, record: dict) -> dict:
        """What the progress bar shows of a step."""
        shown = {"loss": f"{record['query_loss']:.3f}"}
        if "query_accuracy" in record:
            shown["acc"] = f"{record['query_accuracy']:.3f}"
        if self.best["mean"] is not None:
            shown["val"] = f"{self.best['mean']:.3f}"
        if "inner_grad_norm" in record:  # not with mini-batched inner steps
            shown["|∇G|"] = f"{record['inner_grad_norm']:.2g}"  # Theorem 1's δ
        if "solver_residual" in record:
            shown["res"] = f"{record['solver_residual']:.2g}"
            shown["neg"] = f"{record['negative_curvature_frac']:.2f}"
        if "lam" in record:
            shown["λ"] = f"{record['lam']:.3g}"
        return shown

    # -- the loop ----------------------------------------------------------------------------
    def train(
        self, *, time_budget_s: float | None, max_steps_this_run: int | None, tensorboard: bool
    ) -> dict:
        """Meta-steps until the schedule ends, a limit is reached or a signal arrives."""
        cfg = self.cfg
        writer = _tensorboard(self.out) if tensorboard else None
        log = open(self.out / "metrics.jsonl" if self.d.main else os.devnull, "a")
        overlap = reads_one_step_behind(self.device)
        done = 0  # steps this run
        stopped_by, skip_window = None, []
        paused, last_ready = 0.0, None  # seconds of validation and checkpoints, not step time
        t_start = time.perf_counter()

        def can_launch(ahead: int) -> bool:
            """Whether one more step may start, ``ahead`` being launched and not read."""
            return self.step + ahead < cfg.meta_steps and (
                max_steps_this_run is None or done + ahead < max_steps_this_run
            )

        bar = self.progress_bar(compiling=self.compile_mode != "off" and can_launch(0))
        try:
            with StopFlag() as stop, bar:
                nxt = self.launch() if can_launch(0) else None
                while nxt is not None:
                    self.apply(nxt)
                    s, nxt = nxt, None
                    if overlap and can_launch(1):
                        nxt = self.launch()  # queued before step s is read
                    *values, finite = s.read()
                    ready = time.perf_counter()
                    record = dict(zip(s.names, values, strict=True))
                    self.step, done, self.rng_now = self.step + 1, done + 1, s.rng
                    self.check(s, record, bool(finite))
                    start = s.t0 if last_ready is None else last_ready + paused
                    record["step_time"] = ready - start
                    last_ready, paused = ready, 0.0
                    if self.step % cfg.log_every == 0 or self.step == cfg.meta_steps:
                        _log(log, writer, {"kind": "train", "step": self.step, **record})
                    skip_window.append(record["skipped_frac"])
                    self.check_skips(skip_window)
                    bar.set_postfix(self.postfix(record), refresh=False)
                    bar.update(1)
                    t_pause = time.perf_counter()
                    if self.step % cfg.val_every == 0 or self.step == cfg.meta_steps:
                        val = self.validate()
                        if val is not None:
                            _log(log, writer, {"kind": "val", "step": self.step, **val})
                    stopped_by = self.stop_reason(
                        stop,
                        time.perf_counter() - t_start,
                        time_budget_s,
                        done,
                        max_steps_this_run,
                    )
                    at_checkpoint = self.step % cfg.checkpoint_every == 0
                    if stopped_by or at_checkpoint or self.step == cfg.meta_steps:
                        self.save("last")
                    paused = time.perf_counter() - t_pause
                    if stopped_by:
                        break  # a step launched ahead is dropped, unapplied
                    if nxt is None and can_launch(0):
                        nxt = self.launch()
        finally:
            log.close()
            if writer is not None:
                writer.close()
        return self.summary(time.perf_counter() - t_start, done, stopped_by)

    def progress_bar(self, *, compiling: bool):
        """The bar over the schedule (hidden without ``progress``); it says when the first
        step compiles, which takes a while once."""
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(
            total=cfg.meta_steps,
            initial=self.step,
            desc=f"{cfg.algo} {cfg.task}",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        if compiling and self.progress:
            why = ", chosen by --compile auto" if cfg.compile == "auto" else ""
            bar.write(
                f"torch.compile ({self.compile_mode}{why}): compiling the meta-step (one-time)"
            )
        return bar

    def stop_reason(self, stop, elapsed, budget, done, limit) -> str | None:
        """Why the run stops after this step, if it does; every rank agrees (max over ranks)."""
        signal_seen, out_of_time, at_limit = self.d.any(
            stop.signal is not None,
            budget is not None and elapsed >= budget,
            limit is not None and done >= limit,
        )
        if signal_seen:
            return stop.signal or "a signal to another rank"
        if out_of_time:
            return "time budget"
        return "step limit" if at_limit else None

    def summary(self, elapsed: float, done: int, stopped_by: str | None) -> dict:
        step = self.meta_step
        summary = {
            "step": self.step,
            "meta_steps": self.cfg.meta_steps,
            "seconds": elapsed,
            "seconds_per_step": elapsed / max(done, 1),
            "stopped_by": stopped_by,
            "cuda_graph": {"replays": step.replays, "fallback": step.fallback_reason},
            "compile": {
                "mode": self.compile_mode,
                "fallback": step.compile_error,
                "solve_piece": step.solve_piece,
                "query_per_task": step.query_per_task,
                "options": step.compile_options,
            },
            "hvp_mode": getattr(self.alg, "hvp_mode", None),
            "machine": self.machine,
            "best": self.best,
            "out": str(self.out),
        }
        if self.d.main:
            try:
                from .plot import plot_run

                plot_run(self.out)
            except Exception as e:  # a plot must never cost a run its results
                summary["plot_error"] = str(e)
        return summary


def outer_optimizer(cfg: Config, params: dict) -> torch.optim.Optimizer:
    """Adam (the paper's) or plain SGD (Reptile's meta-step) on the meta-parameters; the
    learning rate is set before every step (``Config.outer_lr_at``)."""
    if cfg.outer_optim == "sgd":
        return torch.optim.SGD(params.values(), lr=cfg.outer_lr)
    return torch.optim.Adam(params.values(), lr=cfg.outer_lr, eps=cfg.adam_eps)


def _log(log, writer, entry: dict) -> None:
    """One line of metrics.jsonl (and TensorBoard scalars)."""
    log.write(json.dumps(entry) + "\n")
    log.flush()
    if writer is None:
        return
    if entry["kind"] == "val":
        writer.add_scalar(f"val/{entry['metric']}", entry["mean"], entry["step"])
        return
    for k, v in entry.items():
        if k not in ("kind", "step"):
            writer.add_scalar(f"train/{k}", v, entry["step"])


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError(
            "--tensorboard needs the tensorboard package (pip install tensorboard)"
        ) from e
    return SummaryWriter(str(out / "tensorboard"))
