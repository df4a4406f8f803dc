"""meta_train(cfg, out_dir): the outer loop of Algorithm 1, top to bottom.

Files in the run folder:
- ``config.json``: the full configuration;
- ``metrics.jsonl``: one JSON object per logged step (``"kind": "train"``) and per
  validation (``"kind": "val"``);
- ``last.pt``: everything needed to resume exactly (parameters, Adam state, step, the
  task-sampling RNG state, the data split); ``best.pt``: parameters with the best
  validation score so far;
- ``learning_curve.png``; ``eval.json`` after the final test evaluation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .algorithms import TaskBatch, make_algorithm
from .checkpoint import FORMAT, load_checkpoint, save_checkpoint
from .config import RUNTIME_FIELDS, Config, ConfigError
from .cuda_graph import MetaStep, auto_compile, auto_hvp_mode
from .data import make_task_families
from .data.omniglot import _writable
from .evaluate import evaluate
from .machine import machine_info
from .malloc import keep_freed_memory
from .models import set_conv_impl

# Fixed offsets separate the random streams derived from one seed.
TASK_STREAM, VAL_STREAM, TEST_STREAM = 1_000_003, 2_000_003, 3_000_017
MIN_FREE_BYTES = (
    64 * 2**20
)  # a run folder holds two checkpoints (< 10 MiB each for the paper's nets)
HIGHER_IS_BETTER = {"accuracy": True, "mse": False, "half_sse": False}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def setup_runtime(cfg: Config) -> tuple[torch.device, torch.dtype]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_flush_denormal(
            True
        )  # subnormal floats slowed some CPU runs 5-20× (docs/notebook/prototypes.md)
        if cfg.cpu_malloc == "keep":
            keep_freed_memory()  # no page faults for the same big tensors every step
    return device, getattr(torch, cfg.dtype)


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


def _trim_metrics(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` (by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a line cut by a crash
    path.write_text("".join(line + "\n" for line in keep))


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and returns."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class RunLock:
    """``RUN_DIR/.lock`` holding the owner's PID: a second live run into the same folder is refused.

    A lock left by a process that no longer exists (a killed run) is taken over.
    """

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise ValueError(
                        f"{self.path.parent} is in use by another imaml run (pid {pid}); wait for "
                        "it to finish or choose another --out"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return
        raise ValueError(f"could not take the lock {self.path}")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                _prepare_folder(out, resume=resume)
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
        summary = _train(
            cfg,
            out,
            ckpt,
            d,
            progress=progress and d.main,
            time_budget_s=time_budget_s,
            max_steps_this_run=max_steps_this_run,
            final_test=final_test,
            tensorboard=tensorboard and d.main,
        )
        ok = True
        return summary
    finally:
        if locked:  # never remove a lock this process did not take
            lock.release()
        distributed.close(d, clean=ok)


def _prepare_folder(out: Path, *, resume: bool) -> None:
    """Checks before training: a folder, not holding another run, writable, with free space."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if not resume and (out / "last.pt").exists():
        raise ValueError(
            f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {out} ({e.strerror or e})") from e
    if not _writable(out):
        raise ValueError(f"output folder {out} is not writable")
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise ValueError(
            f"only {free / 2**20:.0f} MiB free in {out}; checkpoints need at least "
            f"{MIN_FREE_BYTES / 2**20:.0f} MiB"
        )
    for tmp in out.glob(".*.pt.*.tmp"):  # left by a checkpoint write that was killed
        tmp.unlink(missing_ok=True)


def _train(
    cfg: Config,
    out: Path,
    ckpt: dict | None,
    d: distributed.Dist,
    *,
    progress: bool,
    time_budget_s: float | None,
    max_steps_this_run: int | None,
    final_test: bool,
    tensorboard: bool,
) -> dict:
    from tqdm import tqdm

    last_path, best_path = out / "last.pt", out / "best.pt"

    device, dtype = setup_runtime(cfg)
    if cfg.cuda_graph == "on" and device.type != "cuda":
        raise ConfigError(f"cuda_graph on needs a CUDA device; this run is on {device}")
    families, split_info = make_task_families(cfg, progress=progress)
    model_gen = torch.Generator().manual_seed(cfg.seed)
    model = families["train"].make_model(model_gen).to(device=device, dtype=dtype)
    set_conv_impl(model, cfg.conv)
    # CUDA graph replay where it applies; torch.compile when asked, or (auto) where it pays
    # over the schedule (the whole of it: a resumed run chooses as the uninterrupted one)
    compile_mode = cfg.compile
    if compile_mode == "auto":
        compile_mode = auto_compile(cfg, device, steps=cfg.meta_steps, algo=cfg.algo)
    kwargs = cfg.algorithm_kwargs()
    if cfg.hvp_mode == "auto" and "hvp_mode" in kwargs:  # the products that suit the step
        kwargs["hvp_mode"] = auto_hvp_mode(device, compile_mode)
    alg = make_algorithm(cfg.algo, model=model, loss=families["train"].loss, **kwargs)
    params = alg.meta_parameters(dict(model.named_parameters()))  # with log λ when learned
    opt = torch.optim.Adam(params.values(), lr=cfg.outer_lr, eps=cfg.adam_eps)
    meta_step = MetaStep(
        alg, mode=cfg.cuda_graph, compile=compile_mode, fallback=cfg.compile == "auto"
    )
    task_gen = torch.Generator().manual_seed(cfg.seed + TASK_STREAM)
    metric = families["train"].metric
    higher = HIGHER_IS_BETTER[metric]
    best = {"step": None, "mean": None}
    step = 0
    if ckpt is not None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(ckpt["params"][k])
        opt.load_state_dict(ckpt["optimizer"])
        task_gen.set_state(ckpt["rng"]["tasks"])
        step, best = ckpt["step"], ckpt["best"]
        if d.main:
            _trim_metrics(out / "metrics.jsonl", step)
    rng_now = task_gen.get_state()  # the task sampler's state after the last step read
    machine = {**machine_info(), "processes": d.world, "from_step": step}
    if d.main:  # rank 0 alone writes files
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        _record_machine(out, machine)

    def save(path: Path, kind: str) -> None:
        if d.main:
            save_checkpoint(path, state(kind))

    def state(kind: str) -> dict:
        s = {
            "format": FORMAT,
            "kind": kind,
            "config": cfg.to_dict(),
            "step": step,
            "params": {k: v.detach().cpu() for k, v in params.items()},
            "split": split_info,
            "best": best,
            "torch": str(torch.__version__),
        }
        if kind == "last":
            s["optimizer"] = opt.state_dict()
            s["rng"] = {"tasks": rng_now}
        return s

    writer = None
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError as e:
            raise ValueError(
                "--tensorboard needs the tensorboard package (pip install tensorboard)"
            ) from e

    def validate_now() -> dict | None:
        if families["val"] is None or cfg.val_tasks == 0:
            return None
        return evaluate(
            alg,
            params,
            families["val"],
            num_tasks=cfg.val_tasks,
            generator=torch.Generator().manual_seed(cfg.seed + VAL_STREAM),
            batch_size=cfg.meta_batch,
            overrides=cfg.eval_overrides(),
            device=device,
            dtype=dtype,
            shard=d,
        )

    t_start = time.perf_counter()
    skip_window: list[float] = []
    steps_this_run = 0
    stopped_by = None
    # On CUDA the host queues meta-step t + 1 before it waits for step t's numbers (one
    # step ahead), so sampling, logging and the copy of the statistics overlap the device's
    # work; everything decided from step t's numbers (the finiteness check, the log,
    # validation, checkpoints, stopping) still happens before step t + 1's outer update.
    # On the CPU nothing overlaps, and each step is read before the next is sampled.
    overlap = reads_one_step_behind(device)
    paused = 0.0  # seconds of validation and checkpointing, not counted in step_time
    last_ready = None

    def can_launch(ahead: int) -> bool:
        """Whether one more step may start, ``ahead`` steps being launched and not read."""
        return step + ahead < cfg.meta_steps and (
            max_steps_this_run is None or steps_this_run + ahead < max_steps_this_run
        )

    def launch(first: bool) -> _Launched:
        t0 = time.perf_counter()
        batch = families["train"].sample(cfg.meta_batch, generator=task_gen, dtype=dtype)
        rng = task_gen.get_state()
        if device.type == "cuda":  # from pinned memory: the copy does not wait for the device
            batch = TaskBatch(*(t.pin_memory() for t in batch)).to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        if compile_mode != "off" and first and progress:
            why = ", chosen by --compile auto" if cfg.compile == "auto" else ""
            bar.write(f"torch.compile ({compile_mode}{why}): compiling the meta-step (one-time)")
        # this rank's share of the tasks; the mean meta-gradient over all ranks. A batch
        # whose tasks are all skipped is refused when its numbers are read (below).
        grads, stats = meta_step(params, d.take(batch), allow_empty=True)
        grads = distributed.mean_over_ranks(d, grads, stats["skipped"])
        stats = distributed.gather_tasks(d, stats)
        return _Launched(grads, stats, rng, t0)

    def apply(s: _Launched) -> None:
        for k, p in params.items():
            p.grad = s.grads.get(k)  # none for a frozen parameter
        s.before = {k: p.detach().clone() for k, p in params.items()}
        opt.step()
        finite = torch.stack([torch.isfinite(p).all() for p in params.values()]).all()
        s.names, values = summary_tensor(s.stats)
        s.read = _to_host(torch.cat([values, finite.double()[None]]))

    log = open(out / "metrics.jsonl" if d.main else os.devnull, "a")
    try:
        with (
            _StopFlag() as stop,
            tqdm(
                total=cfg.meta_steps,
                initial=step,
                desc=f"{cfg.algo} {cfg.task}",
                unit="step",
                disable=not progress,
                dynamic_ncols=True,
            ) as bar,
        ):
            nxt = launch(first=True) if can_launch(0) else None
            while nxt is not None:
                apply(nxt)
                s, nxt = nxt, None
                if overlap and can_launch(1):
                    nxt = launch(first=False)  # queued before step s is read
                *values, finite = s.read()
                ready = time.perf_counter()
                record = dict(zip(s.names, values, strict=True))
                step += 1
                steps_this_run += 1
                rng_now = s.rng
                if not finite or record["skipped_frac"] == 1.0:
                    with torch.no_grad():  # never keep (or save) non-finite parameters
                        for k, p in params.items():
                            p.copy_(s.before[k])
                    if finite:
                        alg.check_not_all_skipped(s.stats)  # raises, with the reason
                    raise ValueError(
                        f"step {step}: the outer update made parameters non-finite; "
                        f"last good checkpoint: {last_path} (try a lower --outer-lr)"
                    )
                start = s.t0 if last_ready is None else last_ready + paused
                record["step_time"] = ready - start
                last_ready, paused = ready, 0.0
                if step % cfg.log_every == 0 or step == cfg.meta_steps:
                    log.write(json.dumps({"kind": "train", "step": step, **record}) + "\n")
                    log.flush()
                    if writer is not None:
                        for k, v in record.items():
                            writer.add_scalar(f"train/{k}", v, step)
                skip_window.append(record["skipped_frac"])
                if len(skip_window) >= 20 and sum(skip_window[-20:]) / 20 > cfg.max_skip_frac:
                    save(last_path, "last")
                    raise ValueError(
                        f"step {step}: {100 * sum(skip_window[-20:]) / 20:.0f}% of tasks over the last 20 "
                        f"meta-steps had a non-finite loss or meta-gradient (limit --max-skip-frac "
                        f"{cfg.max_skip_frac}); lower --inner-lr or check the data. Checkpoint: {last_path}"
                    )
                shown = {"loss": f"{record['query_loss']:.3f}"}
                if "query_accuracy" in record:
                    shown["acc"] = f"{record['query_accuracy']:.3f}"
                if best["mean"] is not None:
                    shown["val"] = f"{best['mean']:.3f}"
                shown["|∇G|"] = f"{record['inner_grad_norm']:.2g}"  # Theorem 1's δ
                if "solver_residual" in record:
                    shown["res"] = f"{record['solver_residual']:.2g}"
                    shown["neg"] = f"{record['negative_curvature_frac']:.2f}"
                if "lam" in record:
                    shown["λ"] = f"{record['lam']:.3g}"
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
                t_pause = time.perf_counter()
                if step % cfg.val_every == 0 or step == cfg.meta_steps:
                    val = validate_now()
                    if val is not None:
                        log.write(json.dumps({"kind": "val", "step": step, **val}) + "\n")
                        log.flush()
                        if writer is not None:
                            writer.add_scalar(f"val/{metric}", val["mean"], step)
                        better = best["mean"] is None or (
                            val["mean"] > best["mean"] if higher else val["mean"] < best["mean"]
                        )
                        if better:
                            best = {"step": step, "mean": val["mean"], "ci95": val["ci95"]}
                            save(best_path, "best")
                elapsed = time.perf_counter() - t_start
                # every rank must stop at the same step: agree on the reasons (max over ranks)
                signal_seen, out_of_time, at_limit = d.any(
                    stop.signal is not None,
                    time_budget_s is not None and elapsed >= time_budget_s,
                    max_steps_this_run is not None and steps_this_run >= max_steps_this_run,
                )
                if signal_seen:
                    stopped_by = stop.signal or "a signal to another rank"
                elif out_of_time:
                    stopped_by = "time budget"
                elif at_limit:
                    stopped_by = "step limit"
                if stopped_by or step % cfg.checkpoint_every == 0 or step == cfg.meta_steps:
                    save(last_path, "last")
                paused = time.perf_counter() - t_pause
                if stopped_by:
                    break  # a step launched ahead is dropped, unapplied
                if nxt is None and can_launch(0):
                    nxt = launch(first=False)
    finally:
        log.close()
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - t_start
    summary = {
        "step": step,
        "meta_steps": cfg.meta_steps,
        "seconds": elapsed,
        "seconds_per_step": elapsed / max(steps_this_run, 1),
        "stopped_by": stopped_by,
        "cuda_graph": {"replays": meta_step.replays, "fallback": meta_step.fallback_reason},
        "compile": {
            "mode": compile_mode,
            "fallback": meta_step.compile_error,
            "solve_piece": meta_step.solve_piece,
            "query_per_task": meta_step.query_per_task,
            "options": meta_step.compile_options,
        },
        "hvp_mode": getattr(alg, "hvp_mode", None),
        "machine": machine,
        "best": best,
        "out": str(out),
    }
    if d.main:
        try:
            from .plot import plot_run

            plot_run(out)
        except Exception as e:  # a plot must never cost a run its results
            summary["plot_error"] = str(e)
    if stopped_by is None and final_test:
        d.barrier()  # best.pt is on disk for every rank
        summary["test"] = evaluate_run(out, progress=progress, shard=d)
    return summary


def _record_machine(out: Path, machine: dict) -> None:
    """Append this run's machine to the folder's machine.json (one entry per start or
    resume, with the step it started from), written atomically."""
    path = out / "machine.json"
    runs = []
    if path.exists():
        try:
            runs = json.loads(path.read_text())["runs"]
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable record is replaced, never fatal to training
    runs = [r for r in runs if r.get("from_step", 0) < machine["from_step"]] + [machine]
    _write_json(path, {"runs": runs})


def _write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename: never half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _inner_record(alg, params, overrides: dict) -> dict:
    """The inner-loop settings evaluation used, with λ as a number (learned or fixed)."""
    settings = alg.inner_settings(**overrides)
    lam = overrides.get("lam", alg.split_meta(params)[1])
    if isinstance(lam, dict):
        lam = {k: float(v) for k, v in lam.items()}
    settings["lam"] = float(lam) if not isinstance(lam, dict) else lam
    settings["solver"] = settings["solver"] if isinstance(settings["solver"], str) else "custom"
    return settings


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    tasks: int | None = None,
    split: str = "test",
    checkpoint: str = "best",
    progress: bool = False,
    seed: int | None = None,
    shard: distributed.Dist | None = None,
    **eval_overrides,
) -> dict:
    """Evaluate a run folder's best (or last) parameters on ``tasks`` tasks; writes eval.json."""
    run = Path(run_dir)
    path = run / f"{checkpoint}.pt"
    if checkpoint == "best" and not path.exists():
        path = run / "last.pt"
    ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["config"])
    changes = {k: v for k, v in eval_overrides.items() if v is not None}
    if changes:
        cfg = cfg.replace(**changes)
    device, dtype = setup_runtime(cfg)
    families, split_info = make_task_families(cfg, progress=progress)
    if families.get(split) is None:
        raise ValueError(f"this run has no {split!r} split")
    model = set_conv_impl(families["train"].make_model(), cfg.conv).to(device=device, dtype=dtype)
    params = {k: v.to(device=device, dtype=dtype) for k, v in ckpt["params"].items()}
    alg = make_algorithm(
        cfg.algo, model=model, loss=families["train"].loss, **cfg.algorithm_kwargs()
    )
    n = cfg.test_tasks if tasks is None else tasks
    gen = torch.Generator().manual_seed(cfg.seed + TEST_STREAM if seed is None else seed)
    t0 = time.perf_counter()
    res = evaluate(
        alg,
        params,
        families[split],
        num_tasks=n,
        generator=gen,
        batch_size=cfg.meta_batch,
        overrides=cfg.eval_overrides(),
        device=device,
        dtype=dtype,
        progress=progress,
        shard=shard,
    )
    result = {
        **res,
        "split": split,
        "checkpoint": path.name,
        "checkpoint_step": ckpt["step"],
        "eval_inner": _inner_record(alg, params, cfg.eval_overrides()),
        # whether a test task can hold a class that training saw (the authors' split)
        "disjoint_test_classes": split != "test" or split_info["test_classes_in_training"] == 0,
        "test_classes_in_training": split_info["test_classes_in_training"]
        if split == "test"
        else None,
        "seconds": time.perf_counter() - t0,
        "config": cfg.to_dict(),
        "machine": {**machine_info(), "processes": 1 if shard is None else shard.world},
    }
    if not math.isfinite(result["mean"]):
        raise ValueError(f"evaluation of {path} gave a non-finite {res['metric']}")
    if shard is None or shard.main:
        _write_json(run / "eval.json", result)
    return result
