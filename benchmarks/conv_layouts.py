"""How to run 32 tasks' convolutions at once on the CPU: vmap's grouped convolution, the
same in channels-last, or one dense convolution per task.

Under ``torch.func.vmap`` the tasks' convolutions (each task its own weights) become one
grouped convolution: the images of all tasks side by side in the channel dimension
(N, T·C, H, W), T groups, NCHW. This measures, for each of the Omniglot network's four
3x3 stride-2 convolutions, forward + backward (weight gradient, and the input gradient
but for the first layer), with 32 tasks of 5 images (a support set: the inner loop and
the Hessian-vector products) and of 75 images (a query set at 15 per class):

- ``vmap-grouped``: ``vmap(F.conv2d)`` over the tasks, what the meta-step runs;
- ``grouped-channels-last``: the same grouped convolution with input, weights and output
  gradient in channels-last (NHWC), which vmap's batching rule does not choose, laid out
  before the timing (the best case: as if the whole network kept that layout);
- ``dense-per-task``: a Python loop of 32 dense convolutions.

Each output is checked against ``vmap-grouped`` (max abs difference, float32). Then the
query gradient (15 images per class, as in the peer step of peers.py, and 1, as in the
omniglot-5w1s preset; the network at 32 tasks' own parameters) vmapped and in a per-task
loop. Last, the whole eager peer meta-step as it is, with the images stored so that
vmap's convolutions run channels-last from the first layer on (``channels_last_per_task``;
the math is the same), and with the query gradient alone in a per-task loop
(``query_looped_step``). Freed memory is kept (``imaml.keep_freed_memory``), as
``imaml train`` does on the CPU.
Writes docs/results/conv_layouts.{json,png}.

    python benchmarks/conv_layouts.py [--repeats 15] [--tasks 32]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from imaml import keep_freed_memory, make_algorithm
from imaml.implicit import solve_implicit
from imaml.models import OmniglotConvNet
from imaml.params import norm, sub

from common import OUT, timeit, write
from roofline import LAYERS

LAYOUTS = ("vmap-grouped", "grouped-channels-last", "dense-per-task")
PER_TASK = (5, 75)  # a support set of 5-way 1-shot; a query set of 15 images per class
conv = lambda x, w: F.conv2d(x, w, stride=2, padding=1)


def layer_fns(x, w, gy):
    """Forward + backward of T tasks' convolutions, x (T, N, C, H, W), w (T, O, C, 3, 3), in
    each layout; each returns (output as (T, N, O, H', W'), gradients)."""
    T, N, C, H, W = x.shape
    wrt_x = C > 1  # the first layer's input is the images

    def vmap_grouped():
        xx, ww = x.detach().requires_grad_(wrt_x), w.detach().requires_grad_()
        y = vmap(conv)(xx, ww)
        return y, torch.autograd.grad(y, (xx, ww) if wrt_x else (ww,), gy)

    # laid out once, outside the timing: the best case for channels-last, as if the whole
    # network kept its activations in it
    cl = torch.channels_last
    xg = x.transpose(0, 1).reshape(N, T * C, H, W).contiguous(memory_format=cl)
    wg = w.reshape(T * w.shape[1], C, 3, 3).contiguous(memory_format=cl)
    Ho = gy.shape[-1]
    gyg = gy.transpose(0, 1).reshape(N, -1, Ho, Ho).contiguous(memory_format=cl)

    def grouped_channels_last():
        xx, ww = xg.detach().requires_grad_(wrt_x), wg.detach().requires_grad_()
        y = F.conv2d(xx, ww, stride=2, padding=1, groups=T)
        grads = torch.autograd.grad(y, (xx, ww) if wrt_x else (ww,), gyg)
        return y.reshape(N, T, -1, Ho, Ho).transpose(0, 1), grads

    def dense_per_task():
        ys, grads = [], []
        for t in range(T):
            xx, ww = x[t].detach().requires_grad_(wrt_x), w[t].detach().requires_grad_()
            y = conv(xx, ww)
            grads.append(torch.autograd.grad(y, (xx, ww) if wrt_x else (ww,), gy[t]))
            ys.append(y)
        return torch.stack(ys), grads

    return {
        "vmap-grouped": vmap_grouped,
        "grouped-channels-last": grouped_channels_last,
        "dense-per-task": dense_per_task,
    }


def layer_rows(tasks: int, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in PER_TASK:
        for c_in, side in LAYERS:
            x = torch.randn(tasks, n, c_in, side, side, generator=g)
            w = torch.randn(tasks, 64, c_in, 3, 3, generator=g) * 0.1
            gy = torch.randn_like(vmap(conv)(x, w))
            fns = layer_fns(x, w, gy)
            ref = fns["vmap-grouped"]()[0]
            out = (side + 1) // 2
            # forward, weight gradient and (but for the images) input gradient: 2 FLOP per MAC
            gflop = 2 * tasks * n * 64 * c_in * 9 * out * out * (3 if c_in > 1 else 2) / 1e9
            for layout, fn in fns.items():
                y = fn()[0]
                t = timeit(fn, repeats=repeats, warmup=2)
                rows.append(
                    {
                        "layer": f"{c_in}x{side}x{side} -> 64",
                        "images_per_task": n,
                        "layout": layout,
                        "median_s": t["median_s"],
                        "gflops_per_s": gflop / t["median_s"],
                        "max_abs_diff_vs_vmap": float((y - ref).detach().abs().max()),
                    }
                )
                print(
                    f"{n:3d} img/task  {rows[-1]['layer']:15s} {layout:22s} "
                    f"{1e3 * t['median_s']:8.2f} ms  {rows[-1]['gflops_per_s']:6.1f} GFLOP/s"
                )
    return rows


def query_case(tasks: int, per_class: int) -> tuple[dict, float]:
    """({"vmap": fn, "per-task loop": fn}, their largest relative distance over the tasks):
    the query gradient at ``per_class`` images per class, the network at 32 tasks' own
    parameters, as after the inner loop."""
    from peers import data

    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g)
    alg = make_algorithm("imaml", model=model)
    batch = data(tasks, per_class, g)
    phi = {
        k: v.detach() + 0.01 * torch.randn(tasks, *v.shape, generator=g)
        for k, v in model.named_parameters()
    }
    loss = lambda p, x, y: alg.loss_of(x, y)(p)
    task = lambda i: {k: v[i] for k, v in phi.items()}
    fns = {
        "vmap": lambda: vmap(grad(loss))(phi, batch.query_x, batch.query_y),
        "per-task loop": lambda: [
            grad(loss)(task(i), batch.query_x[i], batch.query_y[i]) for i in range(tasks)
        ],
    }
    a, b = fns["vmap"](), fns["per-task loop"]()
    # over the whole task gradient (the conv biases before batch norm get ~0)
    a = [{k: v[i] for k, v in a.items()} for i in range(tasks)]
    return fns, max(float(norm(sub(a[i], b[i])) / norm(b[i])) for i in range(tasks))


def query_rows(tasks: int, repeats: int) -> list[dict]:
    """The query gradient, vmapped and per task, at 15 query images per class (the peer
    step) and at 1 (the omniglot-5w1s preset)."""
    rows = []
    for per_class in (15, 1):
        fns, diff = query_case(tasks, per_class)
        for name, fn in fns.items():
            t = timeit(fn, repeats=repeats, warmup=1)
            rows.append(
                {
                    "query_gradient": name,
                    "query_per_class": per_class,
                    "median_s": t["median_s"],
                    "max_rel_diff": diff,
                }
            )
            print(f"query gradient, {per_class:2d}/class, {name:13s} {1e3 * t['median_s']:8.1f} ms")
    return rows


def channels_last_per_task(x):
    """x (T, N, C, H, W) with the same values, stored as (N, H, W, T, C): vmap's grouped
    convolution then sees its (N, T·C, H, W) input as a channels-last view, and its outputs
    keep that layout from layer to layer."""
    return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)


def query_looped_step(alg, params, batch):
    """The iMAML meta-gradient (CG, as peer_algorithm sets it) with the query gradient in a
    per-task loop: vmapped inner loop, looped query gradient, vmapped solve."""
    phi = vmap(lambda sx, sy: alg.adapt(params, sx, sy))(batch.support_x, batch.support_y)
    loss = lambda p, x, y: alg.loss_of(x, y)(p)
    per_task = [
        grad(loss)({k: v[i] for k, v in phi.items()}, batch.query_x[i], batch.query_y[i])
        for i in range(batch.num_tasks)
    ]
    v = {k: torch.stack([q[k] for q in per_task]) for k in phi}

    def solve(phi, v, sx, sy):
        return solve_implicit(
            alg.loss_of(sx, sy), v, phi, lam=alg.lam, solver=alg.solver, steps=alg.cg_steps
        )[0]

    g = vmap(solve)(phi, v, batch.support_x, batch.support_y)
    return {k: x.mean(0) for k, x in g.items()}


def step_rows(tasks: int, repeats: int) -> dict:
    """The whole eager peer meta-step (peers.py's ours-vmap-cg): as it is, with the images
    laid out by ``channels_last_per_task``, and with the query gradient in a per-task loop
    (``query_looped_step``; its distance to the step, in float64 on 4 tasks, is recorded)."""
    from imaml import TaskBatch

    from peers import data, peer_algorithm

    def setup(dtype, n):
        g = torch.Generator().manual_seed(0)
        model = OmniglotConvNet(5, generator=g).to(dtype)
        params = {k: v.detach() for k, v in model.named_parameters()}
        return peer_algorithm(model, solver="cg"), params, data(n, 15, g, dtype=dtype)

    alg, params, batch = setup(torch.float64, 4)
    ref = alg.meta_grad(params, batch)[0]
    distance = float(norm(sub(query_looped_step(alg, params, batch), ref)) / norm(ref))
    print(f"query gradient in a loop vs the step, float64: {distance:.1e}")

    alg, params, batch = setup(torch.float32, tasks)
    cl = TaskBatch(
        channels_last_per_task(batch.support_x),
        batch.support_y,
        channels_last_per_task(batch.query_x),
        batch.query_y,
    )
    variants = {
        "as it is": lambda: alg.meta_grad(params, batch),
        "channels_last_per_task images": lambda: alg.meta_grad(params, cl),
        "query gradient in a per-task loop": lambda: query_looped_step(alg, params, batch),
    }
    rows = []
    for name, fn in variants.items():
        t = timeit(fn, repeats=repeats, warmup=1)
        rows.append({"variant": name, "median_s": t["median_s"]})
        print(f"peer meta-step, {name:34s} {t['median_s']:6.2f} s")
    return {"rows": rows, "query_looped_vs_step_float64": distance}


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PER_TASK), figsize=(11, 4.2))
    for ax, n in zip(axes, PER_TASK, strict=True):
        rows = [r for r in payload["layers"] if r["images_per_task"] == n]
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        width = 0.8 / len(LAYOUTS)
        for i, layout in enumerate(LAYOUTS):
            ms = [
                1e3
                * next(r["median_s"] for r in rows if r["layer"] == la and r["layout"] == layout)
                for la in layers
            ]
            ax.bar([j + i * width for j in range(len(layers))], ms, width, label=layout)
        ax.set_xticks([j + width for j in range(len(layers))], layers, fontsize=8)
        ax.set_ylabel("ms, forward + backward")
        ax.set_title(f"{payload['config']['tasks']} tasks x {n} images")
    axes[0].legend(fontsize=8)
    fig.suptitle("Omniglot network's convolutions, all tasks at once (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tasks", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    keep_freed_memory()
    layers = layer_rows(args.tasks, args.repeats)
    totals = {
        f"{layout}, {n} images/task": sum(
            r["median_s"] for r in layers if r["layout"] == layout and r["images_per_task"] == n
        )
        for n in PER_TASK
        for layout in LAYOUTS
    }
    for k, v in totals.items():
        print(f"all four layers, {k:40s} {1e3 * v:8.1f} ms")
    payload = {
        "config": vars(args),
        "layers": layers,
        "four_layers_s": totals,
        "query_gradient": query_rows(args.tasks, max(3, args.repeats // 3)),
        "meta_step": step_rows(args.tasks, max(3, args.repeats // 3)),
    }
    write("conv_layouts", payload)
    plot(payload, OUT / "conv_layouts.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
