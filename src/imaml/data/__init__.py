"""Task families. Each has ``sample(num_tasks, *, generator) -> TaskBatch``, a ``loss``
name, a ``metric`` name, and ``make_model(generator)`` building the paper's network."""

from __future__ import annotations


def make_task_families(cfg, *, progress: bool = True) -> tuple[dict, dict]:
    """{"train", "val", "test"} → task family for ``cfg``, and a description of the split.
    Meta-training tasks have ``cfg.train_k`` support examples per class, the others K."""
    if cfg.task == "sinusoid":
        from .sinusoid import SinusoidTasks

        fam = SinusoidTasks(k_shot=cfg.k_shot, k_query=cfg.queries)
        train = SinusoidTasks(k_shot=cfg.train_k, k_query=cfg.queries)
        info = {"kind": "none (fresh sinusoids)", "test_classes_in_training": 0}
        return {"train": train, "val": fam, "test": fam}, info
    if cfg.task == "omniglot":
        from .omniglot import OmniglotTasks, load_omniglot, make_split, training_classes_in_test

        data = load_omniglot(cfg.data_dir, progress=progress)
        split = make_split(data, kind=cfg.split, seed=cfg.split_seed, val_classes=cfg.val_classes)
        fams = {}
        for name, classes in split.items():
            if name == "val" and not classes:
                fams[name] = None
                continue
            k = cfg.train_k if name == "train" else cfg.k_shot
            fams[name] = OmniglotTasks(
                data, classes, n_way=cfg.n_way, k_shot=k, k_query=cfg.queries
            )
        info = {
            "kind": cfg.split,
            "seed": cfg.split_seed,
            "fingerprint": data.fingerprint,
            "test_classes_in_training": training_classes_in_test(split),
            **{f"{k}_classes": [data.names[i] for i in v] for k, v in split.items()},
        }
        return fams, info
    if cfg.task == "miniimagenet":
        from .miniimagenet import MiniImagenetTasks, load_miniimagenet

        fams = {}
        for name in ("train", "val", "test"):
            data = load_miniimagenet(cfg.data_dir, name)
            k = cfg.train_k if name == "train" else cfg.k_shot
            fams[name] = MiniImagenetTasks(data, n_way=cfg.n_way, k_shot=k, k_query=cfg.queries)
        return fams, {"kind": "ravi-larochelle", "test_classes_in_training": 0}
    raise ValueError(f"unknown task {cfg.task!r}")
