"""One frozen, validated configuration for a run, and the paper's presets.

The full config is stored in every checkpoint, ``config.json`` and results file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from .algorithms import ALGORITHMS, hyperparameter_names
from .autodiff import CURVATURES, HVP_MODES
from .checks import check_choice, check_int, check_number
from .fast.pieces import piecewise_unsupported
from .inner import VARIANTS, check_mini_batch
from .inner_optim import INNER_SOLVERS
from .linalg import SOLVERS

TASKS = ("omniglot", "miniimagenet", "sinusoid")
DEFAULT_LAM = {"imaml": 2.0, "maml": 0.0, "fomaml": 0.0, "reptile": 0.0}


# Fields that do not change what is learned: they may differ when a run is resumed.
RUNTIME_FIELDS = (
    "dist_timeout",
    "meta_steps",
    "threads",
    "device",
    "data_dir",
    "checkpoint_every",
    "log_every",
    "val_every",
    "val_tasks",
    "test_tasks",
    "flat",
    "task_chunk",
    "cuda_graph",
    "compile",
    "cpu_malloc",
)


class ConfigError(ValueError):
    """An invalid configuration value or combination."""


@dataclass(frozen=True)
class Config:
    # what to learn
    task: str = "omniglot"
    algo: str = "imaml"
    n_way: int = 5
    k_shot: int = 1
    k_query: int | None = None  # None: same as k_shot (the paper's Q = K)
    train_shots: int | None = None  # support per class in training tasks; None: K (Nichol: 10)
    split: str = "paper"  # omniglot: paper | background | authors (overlapping, theirs)
    split_seed: int = 0
    val_classes: int = 100
    data_dir: str | None = None
    # inner problem and meta-gradient (paper symbols)
    lam: float | None = None  # λ; None: 2.0 for imaml, 0 (no proximal term) for the baselines
    inner_steps: int = 16
    inner_lr: float = 0.1
    inner_solver: str = "gd"
    variant: str = "paper"
    inner_tol: float = 0.0  # stop a task's inner loop once ‖∇G(φ)‖ ≤ inner_tol (0: never early)
    inner_batch: int | None = None  # support examples per inner step; None: all (Nichol: 10)
    inner_cg_steps: int = 5  # CG steps per Newton direction (inner_solver newton_cg)
    cg_steps: int = 5
    solver: str = "minres"
    cg_damping: float = 0.0
    lam_damping: float = 0.0
    hvp_mode: str = "auto"  # auto | rev | fwd (auto: fwd for compiled pieces on CUDA, else rev)
    curvature: str = "hessian"  # hessian | ggn: H or the Gauss–Newton matrix in I + H/λ
    learn_lam: str = "none"  # none | scalar | per_tensor (imaml)
    # outer loop
    meta_batch: int = 32
    meta_steps: int = 20000
    outer_optim: str = "adam"  # adam | sgd (Reptile's meta-step: θ ← θ + ε(φ̄ − θ))
    outer_lr: float = 1e-3
    outer_lr_final: float | None = None  # linear decay of outer_lr to this (None: constant)
    decay_steps: int | None = None  # ... over this many steps (None: meta_steps at creation)
    adam_eps: float = 1e-3
    seed: int = 0
    # evaluation: None means "as in training"
    eval_lam: float | None = None
    eval_inner_steps: int | None = None
    eval_inner_lr: float | None = None
    eval_inner_batch: int | None = None
    val_every: int = 500
    val_tasks: int = 200
    test_tasks: int = 600
    # bookkeeping
    checkpoint_every: int = 100
    log_every: int = 1
    # stop if more tasks than this were skipped (non-finite) over the last 20 steps
    max_skip_frac: float = 0.1
    # seconds a rank waits for the others under torchrun before the job fails
    dist_timeout: float = 300.0
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None
    batched: bool = True
    flat: str = "auto"  # auto | on | off: the network's tensors as one vector (auto: CUDA)
    task_chunk: int | None = None  # vmap over this many tasks at a time (bounds memory)
    cuda_graph: str = "auto"  # auto | on | off: replay the meta-step as a CUDA graph
    compile: str = "auto"  # auto | off | step | pieces: torch.compile the meta-step (cuda_graph)
    cpu_malloc: str = "keep"  # keep | system: glibc keeps freed memory for reuse (imaml.malloc)

    def __post_init__(self):
        if isinstance(self.compile, bool):  # configs written before compile took a mode
            object.__setattr__(self, "compile", "step" if self.compile else "off")
        if self.outer_lr_final is not None and self.decay_steps is None:  # fixed at creation,
            object.__setattr__(self, "decay_steps", self.meta_steps)  # so a resume keeps it
        validate(self)

    @property
    def queries(self) -> int:
        return self.k_shot if self.k_query is None else self.k_query

    @property
    def train_k(self) -> int:
        """Support examples per class of a meta-training task (validation and test use K)."""
        return self.k_shot if self.train_shots is None else self.train_shots

    @property
    def lam_value(self) -> float:
        return DEFAULT_LAM[self.algo] if self.lam is None else self.lam

    def outer_lr_at(self, step: int) -> float:
        """The outer learning rate of the step taken after ``step`` steps: ``outer_lr``
        decayed linearly to ``outer_lr_final`` over ``decay_steps``, then held."""
        if self.outer_lr_final is None:
            return self.outer_lr
        frac = min(step / self.decay_steps, 1.0) if self.decay_steps else 1.0
        return self.outer_lr + frac * (self.outer_lr_final - self.outer_lr)

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        if "conv" in d:  # a field of configs saved before the convolution variants left
            if d["conv"] != "native":
                raise ConfigError(
                    f"conv {d['conv']!r}: the convolution variants left the library (they "
                    "were slower everywhere; benchmarks/conv_variants.py has them); use native"
                )
            d = {k: v for k, v in d.items() if k != "conv"}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def algorithm_kwargs(self) -> dict:
        """The hyperparameters the chosen algorithm accepts, taken from this config."""
        values = {
            "lam": self.lam_value,
            "inner_steps": self.inner_steps,
            "inner_lr": self.inner_lr,
            "inner_solver": self.inner_solver,
            "variant": self.variant,
            "cg_steps": self.cg_steps,
            "solver": self.solver,
            "cg_damping": self.cg_damping,
            "lam_damping": self.lam_damping,
            # auto is reverse mode unless training compiles the pieces on CUDA (train.py)
            "hvp_mode": "rev" if self.hvp_mode == "auto" else self.hvp_mode,
            "curvature": self.curvature,
            "batched": self.batched,
            "flat": {"auto": None, "on": True, "off": False}[self.flat],
            "task_chunk": self.task_chunk,
            "inner_tol": self.inner_tol,
            "inner_batch": self.inner_batch,
            # newton_cg takes both: its CG steps, and the curvature of its Newton system
            "inner_options": {"cg_steps": self.inner_cg_steps, "curvature": self.curvature},
            "learn_lam": self.learn_lam,
        }
        accepted = set(hyperparameter_names(self.algo))
        return {k: v for k, v in values.items() if k in accepted}

    def eval_overrides(self) -> dict:
        """Inner-loop settings evaluation changes; the rest (λ too, learned or not) as trained."""
        out = {
            "lam": self.eval_lam,
            "inner_steps": self.eval_inner_steps,
            "inner_lr": self.eval_inner_lr,
            "inner_batch": self.eval_inner_batch,
        }
        return {k: v for k, v in out.items() if v is not None}


def _int(cfg, name, minimum):
    check_int(name, getattr(cfg, name), minimum, error=ConfigError)


def _num(cfg, name, *, positive, allow_none=False):
    v = getattr(cfg, name)
    if not (v is None and allow_none):
        check_number(name, v, positive=positive, error=ConfigError)


def _choice(cfg, name, options):
    check_choice(name, getattr(cfg, name), options, error=ConfigError)


def _types(cfg: Config) -> None:
    """Strings where strings belong, booleans where booleans belong (e.g. from a JSON file)."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if "str" in str(f.type) and not (
            isinstance(v, str) or (v is None and "None" in str(f.type))
        ):
            raise ConfigError(f"{f.name} must be a string, got {v!r}")
        if str(f.type) == "bool" and not isinstance(v, bool):
            raise ConfigError(f"{f.name} must be true or false, got {v!r}")


# Options of iMAML's linear solve: given with another algorithm they would be ignored
# without a word, so the command line refuses them (``check_applies``).
IMPLICIT_ONLY = ("solver", "cg_steps", "cg_damping", "lam_damping", "curvature", "hvp_mode")


def check_applies(algo: str, given: dict) -> None:
    """ConfigError, in one line naming the clash, for an option ``given`` explicitly that
    ``algo`` has no use for (saved configs keep every field, so this checks what a user
    asked for, not a whole Config)."""
    if algo == "imaml":
        return
    for name in IMPLICIT_ONLY:
        if name in given:
            raise ConfigError(
                f"--{name.replace('_', '-')} applies to imaml's implicit meta-gradient; "
                f"{algo} has none (drop it or use --algo imaml)"
            )


def validate(cfg: Config) -> None:
    _types(cfg)
    _choice(cfg, "task", TASKS)
    _choice(cfg, "algo", tuple(ALGORITHMS))
    _choice(cfg, "inner_solver", tuple(INNER_SOLVERS))
    _choice(cfg, "variant", VARIANTS)
    _choice(cfg, "solver", SOLVERS)
    _choice(cfg, "hvp_mode", ("auto", *HVP_MODES))
    _choice(cfg, "curvature", CURVATURES)
    _choice(cfg, "learn_lam", ("none", "scalar", "per_tensor"))
    if cfg.learn_lam != "none" and cfg.algo != "imaml":
        raise ConfigError(f"learn_lam is an imaml option; {cfg.algo} has no λ to learn")
    _choice(cfg, "dtype", ("float32", "float64"))
    _choice(cfg, "split", ("paper", "background", "authors"))
    if not (cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda")):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    for name in ("n_way", "k_shot", "meta_batch", "val_every", "checkpoint_every", "log_every"):
        _int(cfg, name, 1)
    for name in (
        "inner_steps",
        "cg_steps",
        "inner_cg_steps",
        "meta_steps",
        "val_tasks",
        "split_seed",
        "seed",
        "val_classes",
    ):
        _int(cfg, name, 0)
    _int(cfg, "test_tasks", 1)
    if cfg.k_query is not None:
        _int(cfg, "k_query", 1)
    if cfg.train_shots is not None:
        _int(cfg, "train_shots", 1)
    if cfg.eval_inner_steps is not None:
        _int(cfg, "eval_inner_steps", 0)
    for name in ("inner_batch", "eval_inner_batch"):
        if getattr(cfg, name) is not None:
            _int(cfg, name, 1)
    if cfg.inner_batch is not None or cfg.eval_inner_batch is not None:
        try:
            check_mini_batch(cfg.inner_solver, cfg.inner_tol)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _choice(cfg, "outer_optim", ("adam", "sgd"))
    _num(cfg, "outer_lr_final", positive=False, allow_none=True)
    if cfg.decay_steps is not None:
        _int(cfg, "decay_steps", 0)
    if cfg.threads is not None:
        _int(cfg, "threads", 1)
    if cfg.task_chunk is not None:
        _int(cfg, "task_chunk", 1)
    _choice(cfg, "cuda_graph", ("auto", "on", "off"))
    _choice(cfg, "flat", ("auto", "on", "off"))
    _choice(cfg, "cpu_malloc", ("keep", "system"))
    _choice(cfg, "compile", ("auto", "off", "step", "pieces"))
    for name in ("cuda_graph", "compile"):
        if getattr(cfg, name) in ("on", "step", "pieces") and not cfg.batched:
            raise ConfigError(f"{name} needs the batched path (drop --no-batched)")
    _num(cfg, "lam", positive=cfg.algo == "imaml", allow_none=True)
    _num(cfg, "eval_lam", positive=False, allow_none=True)
    for name in ("inner_lr", "outer_lr", "adam_eps", "dist_timeout"):
        _num(cfg, name, positive=True)
    _num(cfg, "eval_inner_lr", positive=True, allow_none=True)
    if not (isinstance(cfg.max_skip_frac, int | float) and 0 <= cfg.max_skip_frac <= 1):
        raise ConfigError(f"max_skip_frac must be in [0, 1], got {cfg.max_skip_frac!r}")
    for name in ("cg_damping", "lam_damping", "inner_tol"):
        _num(cfg, name, positive=False)
    shots = max(cfg.k_shot, cfg.train_k)
    what = "k_shot" if shots == cfg.k_shot else "train_shots"
    if cfg.task == "omniglot" and shots + cfg.queries > 20:
        raise ConfigError(
            f"{what} + k_query = {shots + cfg.queries} exceeds the 20 drawings per Omniglot "
            "character"
        )
    if cfg.task == "miniimagenet" and shots + cfg.queries > 600:
        raise ConfigError(f"{what} + k_query exceeds the 600 images per Mini-ImageNet class")
    if cfg.compile == "pieces":
        if (why := piecewise_unsupported(cfg, algo=cfg.algo)) is not None:
            raise ConfigError(f"compile pieces does not support {why}; use --compile step")


# The paper's iMAML-GD settings (docs/paper.md); each field can be overridden.
_OMNIGLOT = dict(
    task="omniglot",
    inner_lr=0.1,
    cg_steps=5,
    meta_batch=32,
    outer_lr=1e-3,
    adam_eps=1e-3,
    meta_steps=20000,
)
# iMAML's own settings on these presets, applied only when the algorithm is imaml (so the
# baselines keep λ = 0) and the field was not given: the authors' inner loop (plain steps,
# then one step on the proximal term), the Gauss–Newton curvature with CG, and λ = 0.5,
# close to 1/(αK) = 0.625, where the proximal solution and K plain steps of size α adapt
# alike. The learning-speed study chose them over the paper's loop with λ = 2
# (docs/reproduction.md, "The defaults, and why").
OMNIGLOT_IMAML = dict(variant="reference_code", curvature="ggn", solver="cg", lam=0.5)
_OMNIGLOT_GD = {
    "omniglot-5w1s": dict(_OMNIGLOT, n_way=5, k_shot=1, inner_steps=16),
    "omniglot-5w5s": dict(_OMNIGLOT, n_way=5, k_shot=5, inner_steps=16),
    "omniglot-20w1s": dict(_OMNIGLOT, n_way=20, k_shot=1, inner_steps=25),
    "omniglot-20w5s": dict(_OMNIGLOT, n_way=20, k_shot=5, inner_steps=25),
}
PRESETS: dict[str, dict] = {
    **_OMNIGLOT_GD,
    # iMAML-HF: the same tasks with the Newton-CG ("Hessian-free") inner solver
    **{
        f"{name}-hf": dict(
            values, inner_solver="newton_cg", inner_steps=5, inner_lr=1.0, inner_cg_steps=5
        )
        for name, values in _OMNIGLOT_GD.items()
    },
    "miniimagenet-5w1s": dict(
        task="miniimagenet",
        n_way=5,
        k_shot=1,
        k_query=15,
        inner_steps=10,
        inner_lr=0.01,
        cg_steps=5,
        meta_batch=4,
        outer_lr=1e-3,
        adam_eps=1e-8,
        meta_steps=60000,
    ),
    "sinusoid": dict(
        task="sinusoid",
        n_way=1,
        k_shot=10,
        k_query=10,
        inner_steps=5,
        inner_lr=0.01,
        meta_batch=32,
        outer_lr=1e-3,
        adam_eps=1e-8,
        meta_steps=20000,
        val_every=500,
        val_tasks=100,
    ),
}
# The -hf presets' iMAML: Newton-CG solves the proximal problem itself (the paper's loop),
# each Newton step on the Gauss–Newton matrix + λI (always a descent direction), then CG on
# I + G/λ, λ = 0.5. At 250 steps it matched the paper's settings (H, MINRES, λ = 2) in the
# common evaluation and beat them by 4.4 points with its own inner loop, never met negative
# curvature (25% of tasks did with H) and cost less per step (docs/reproduction.md).
OMNIGLOT_IMAML_HF = dict(curvature="ggn", solver="cg", lam=0.5)
IMAML_SETTINGS: dict[str, dict] = {
    **{name: OMNIGLOT_IMAML for name in _OMNIGLOT_GD},
    **{f"{name}-hf": OMNIGLOT_IMAML_HF for name in _OMNIGLOT_GD},
}


# Reptile's settings on the Omniglot GD presets, applied as iMAML's are: Nichol et al.'s
# protocol, whose transductive figures are the paper's Reptile row (10 training shots per
# class, inner steps on mini-batches of 10, 20-way 20; the meta-step θ ← θ + ε(φ̄ − θ) with
# ε from 1 to 0; 50 steps to evaluate; their 100k (20-way 200k) steps of 5 tasks as
# 20,000 of 25 (50)), with plain inner steps of the presets' size 0.1 in place of their
# Adam, whose state carries over from task to task there: a fresh Adam per task grew θ's
# norm and stopped near 70% (docs/reproduction.md, "The paper's table"). Evaluation takes
# their 50 steps, of the size best on validation tasks of the finished cell of that many
# shots (docs/results/eval_settings_*): 1-shot 0.03 (97.6% on 5w1s, 96.3% at the training's
# 0.1), 5-shot 0.01 (99.21% on 5w5s, 99.06% at 0.03, 97.29% at 0.1).
def _nichol(n_way: int, k_shot: int) -> dict:
    five = n_way == 5
    return dict(
        train_shots=10,
        inner_solver="gd",
        inner_steps=5 if five else 10,
        inner_lr=0.1,
        inner_batch=10 if five else 20,
        outer_optim="sgd",
        outer_lr=1.0,
        outer_lr_final=0.0,
        meta_batch=25 if five else 50,
        eval_inner_steps=50,
        eval_inner_lr=0.03 if k_shot == 1 else 0.01,
        eval_inner_batch=5 if five else 10,
    )


REPTILE_SETTINGS = {name: _nichol(v["n_way"], v["k_shot"]) for name, v in _OMNIGLOT_GD.items()}
ALGO_SETTINGS = {"imaml": IMAML_SETTINGS, "reptile": REPTILE_SETTINGS}
PRESET_NOTES = {
    **{
        f"omniglot-{s}-hf": "iMAML-HF: Newton-CG inner solver on the Gauss–Newton matrix + λI (5 CG "
        "steps per direction, Armijo line search from step 1), CG on I + G/λ, λ = 0.5 for imaml; "
        "the paper does not state the number of Newton iterations, 5 is ours"
        for s in ("5w1s", "5w5s", "20w1s", "20w5s")
    },
    "miniimagenet-5w1s": "inner settings follow MAML's Mini-ImageNet protocol (the paper gives "
    "no iMAML-GD values for it); λ = 2 for imaml",
    "sinusoid": "MAML's sinusoid protocol (10-shot, 1→40→40→1 MLP)",
}


def from_preset(name: str, **overrides) -> Config:
    """The preset's values under ``overrides``; for imaml and reptile, also the preset's
    settings of that algorithm (``ALGO_SETTINGS``) that ``overrides`` leaves open."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    algo = overrides.get("algo", PRESETS[name].get("algo", Config.algo))  # Config's default
    settings = ALGO_SETTINGS.get(algo, {}).get(name, {}) if isinstance(algo, str) else {}
    return Config.from_dict({**PRESETS[name], **settings, **overrides})
