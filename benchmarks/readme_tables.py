"""Print the README's results tables (markdown) from the JSON files in docs/results/.

python benchmarks/readme_tables.py > /tmp/tables.md
"""

from __future__ import annotations

import json
import sys
from functools import partial

from common import OUT


def load(name):
    p = OUT / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


NAN = float("nan")


def pct(x, ci):
    return f"{100 * x:.1f} ± {100 * ci:.1f}"


def fig2b_table(r) -> None:
    algos = sorted({x["algo"] for x in r["rows"]})
    steps = sorted({x["inner_steps"] for x in r["rows"]})
    cell = {(x["algo"], x["inner_steps"]): x for x in r["rows"]}
    print("| inner steps | " + " | ".join(f"{a} s / peak MiB" for a in algos) + " |")
    print("|---|" + "---|" * len(algos))
    for k in steps:
        row = []
        for a in algos:
            x = cell.get((a, k))
            if x is None:
                row.append("–")
            elif "error" in x:
                row.append(x["error"])
            else:
                row.append(f"{x['seconds']:.2f} / {x['peak_mib']:.0f}")
        print(f"| {k} | " + " | ".join(row) + " |")
    print()


def peers_table(r) -> None:
    refs = (
        ("torchopt", "TorchOpt"),
        ("torchopt_example", "TorchOpt's example"),
        ("ours_loop", "our loop"),
    )
    refs = [(k, n) for k, n in refs if any(f"speedup_vs_{k}" in x for x in r["rows"])]
    if all("peak_rss_mib" not in x for x in r["rows"]):  # --interleave: one process
        print(
            "| implementation | malloc | s / meta-step (median) | fastest–slowest | first call |"
            + "".join(f" speed-up vs {name} |" for _, name in refs)
        )
        print("|---|---|---|---|---|" + "---|" * len(refs))
        for x in r["rows"]:
            if "error" in x:
                print(
                    f"| {x['impl']} | {x['malloc']} | failed: {x['error']} |"
                    + " |" * (2 + len(refs))
                )
                continue
            print(
                f"| {x['impl']} | {x['malloc']} | {x['median_s']:.2f} | "
                f"{x['min_s']:.2f}–{x['max_s']:.2f} | {x['first_call_s']:.1f} s |"
                + "".join(f" {x.get(f'speedup_vs_{key}', NAN):.2f}× |" for key, _ in refs)
            )
        print()
        return
    print(
        "| implementation | malloc | s / meta-step | first call | page faults / step | peak RSS |"
        + "".join(f" speed-up vs {name} |" for _, name in refs)
    )
    print("|---|---|---|---|---|---|" + "---|" * len(refs))
    for x in r["rows"]:
        malloc = x.get("malloc", "system")
        if "error" in x:
            print(f"| {x['impl']} | {malloc} | failed: {x['error']} |" + " |" * (3 + len(refs)))
            continue
        first = f"{x['first_call_s']:.1f} s" if "first_call_s" in x else "–"
        faults = x.get("minor_faults_per_step")
        print(
            f"| {x['impl']} | {malloc} | {x['median_s']:.2f} | {first} | "
            f"{'–' if faults is None else f'{faults:,.0f}'} | {x['peak_rss_mib']:.0f} MiB |"
            + "".join(f" {x.get(f'speedup_vs_{key}', NAN):.2f}× |" for key, _ in refs)
        )
    print()


def timed_runs_table(r, *, key: str, label: str, minutes: int, test_step: bool) -> None:
    """Runs trained for the same wall-clock budget: steps, speed, best validation, test."""
    print(
        f"| {label} | meta-steps in {minutes} min | median s / meta-step "
        "| best validation (step) | test accuracy, 600 tasks |"
    )
    print("|---|---|---|---|---|")
    for x in r["runs"]:
        bv, t = x.get("best_val", {}), x.get("test", {})
        at = f" (step {t.get('checkpoint_step')})" if test_step else ""
        print(
            f"| {x[key]} | {x['steps']} | {x['median_seconds_per_step']:.2f} | "
            f"{pct(bv.get('mean', 0), bv.get('ci95', 0))} ({bv.get('step')}) | "
            f"{pct(t.get('mean', 0), t.get('ci95', 0))}{at} |"
        )
    print()


def inner_solvers_table(r) -> None:
    print(
        "| inner solver | inner lr | iterations to ‖∇G‖ ≤ 1e-3 (mean / max) | tasks reaching it | s / meta-step | peak RSS, 1 iteration | peak RSS, 100 iterations |"
    )
    print("|---|---|---|---|---|---|---|")
    for x in r["rows"]:
        print(
            f"| {x['solver']} | {x['inner_lr']} | {x['iterations_mean']:.1f} / {x['iterations_max']} | "
            f"{100 * x['fraction_reached_tol']:.0f}% | {x['seconds_per_meta_step']:.2f} | "
            f"{x['peak_rss_mib_1_iter']:.0f} MiB | {x['peak_rss_mib_100_iter']:.0f} MiB |"
        )
    print()


def vmap_vs_loop_table(r) -> None:
    print("| task | algorithm | vmap (s / meta-step) | per-task loop | speed-up |")
    print("|---|---|---|---|---|")
    for x in r["rows"]:
        print(
            f"| {x['task']} | {x['algo']} | {x['vmap']['median_s']:.3f} | {x['loop']['median_s']:.3f} | "
            f"{x['speedup']:.1f}× |"
        )
    print()


def hvp_modes_table(r) -> None:
    print(
        "| tasks (vmap) | pattern | reverse-over-reverse (ms / task) | forward-over-reverse (ms / task) |"
    )
    print("|---|---|---|---|")
    rows = {(x["tasks"], x["pattern"], x["mode"]): x["per_task_ms"] for x in r["rows"]}
    for t, p, m in rows:
        if m == "rev":
            print(f"| {t} | {p} | {rows[(t, p, 'rev')]:.1f} | {rows[(t, p, 'fwd')]:.1f} |")
    print()


def query_per_task_table(r) -> None:
    by = {}
    for x in r["rows"]:
        if "vmap" in x:
            by.setdefault(x["images_per_task"], []).append(x)
    n = r["config"]["processes"]
    print(f"| query images per task | vmap (ms, {n} processes) | task by task (ms) |")
    print("|---|---|---|")
    for k, xs in sorted(by.items()):
        v = [x["vmap"]["median_ms"] for x in xs]
        t = [x["per-task"]["median_ms"] for x in xs]
        print(f"| {k} | {min(v):.0f}–{max(v):.0f} | {min(t):.0f}–{max(t):.0f} |")
    print()


def peers_float64_lines(r) -> None:
    for k, v in r["distance_to_converged"].items():
        print(f"float64, {k}: {v:.2f} from the converged meta-gradient")
    for k, v in r["cg_rows_vs_ours_vmap_cg"].items():
        print(f"float64, {k} vs ours-vmap-cg: {v:.1e}")
    print()


def roofline_table(r, name) -> None:
    print(f"{name} ({r['machine'].get('cpu_model', r['machine']['cpu'])}):")
    f = r["step_flops"]
    print(
        "one meta-step: "
        + ", ".join(f"{k} {v.get('gflop', NAN):.1f} GFLOP" for k, v in f.items())
        + f"; best dense-convolution rate {r['best_dense_conv_gflops_per_s']:.0f} GFLOP/s, "
        f"floor {r['floor_s_ours']:.2f} s"
    )
    print()
    batches = sorted({x["images"] for x in r["dense_conv_layers"]})
    print("| layer (fwd + bwd), GFLOP/s at | " + " | ".join(f"{n} images" for n in batches) + " |")
    print("|---|" + "---|" * len(batches))
    cell = {(x["layer"], x["images"]): x["gflops_per_s"] for x in r["dense_conv_layers"]}
    for layer in dict.fromkeys(x["layer"] for x in r["dense_conv_layers"]):
        print(f"| {layer} | " + " | ".join(f"{cell[layer, n]:.0f}" for n in batches) + " |")
    print()
    for i, x in enumerate(r.get("rounds", [])):
        if "ours_loop_s" in x:
            print(
                f"round {i + 1}: best dense rate {x['best_dense_conv_gflops_per_s']:.0f} "
                f"GFLOP/s, our loop {x['ours_loop_s']:.2f} s "
                f"({100 * x['ours_loop_fraction_of_best']:.0f}%)"
            )
    scaled = any("seconds_at_this_speed" in x for x in r["achieved"])
    print(
        "| implementation | malloc | s / meta-step (peer run) | "
        + ("s / meta-step at this run's speed | " if scaled else "")
        + "GFLOP/s | of the best dense rate |"
    )
    print("|---|---|---|" + ("---|" if scaled else "") + "---|---|")
    for x in r["achieved"]:
        at = f"{x['seconds_at_this_speed']:.2f} | " if scaled else ""
        print(
            f"| {x['impl']} | {x['malloc']} | {x['median_s']:.2f} | {at}"
            f"{x['gflops_per_s']:.0f} | {100 * x['fraction_of_best']:.0f}% |"
        )
    print()
    for t in r.get("targets", []):
        print(
            f"{t['for']} ({t['malloc']}) for {t['target']}: {t['seconds']:.2f} s, "
            f"{t['gflops_per_s']:.0f} GFLOP/s, {100 * t['fraction_of_best']:.0f}% of the best"
        )
    if r.get("targets"):
        print()


def conv_layouts_table(r) -> None:
    per_task = sorted({x["images_per_task"] for x in r["layers"]})
    print("| layout | " + " | ".join(f"4 layers, {n} images/task (ms)" for n in per_task) + " |")
    print("|---|" + "---|" * len(per_task))
    for layout in dict.fromkeys(x["layout"] for x in r["layers"]):
        cells = [1e3 * r["four_layers_s"][f"{layout}, {n} images/task"] for n in per_task]
        print(f"| {layout} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print()
    for x in r["query_gradient"]:
        print(
            f"query gradient, {x.get('query_per_class', 15)}/class, {x['query_gradient']}: "
            f"{1e3 * x['median_s']:.0f} ms"
        )
    step = r.get("meta_step", {})
    for x in step.get("rows", []):
        print(f"peer meta-step, {x['variant']}: {x['median_s']:.2f} s")
    if step:
        print(f"query-looped vs step, float64: {step['query_looped_vs_step_float64']:.1e}")
    print()


def cpu_variants_table(r) -> None:
    print(f"solver: {r['config']['solver']}")
    print()
    print(
        "| variant | s / meta-step | first call | speed-up vs eager | "
        "meta-gradient vs float64 | peak RSS |"
    )
    print("|---|---|---|---|---|---|")
    for x in r["rows"]:
        if "error" in x:
            print(f"| {x['variant']} | failed: {x['error']} | | | | |")
            continue
        rss = f"{x['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in x else "–"
        print(
            f"| {x['variant']} | {x['median_s']:.2f} | {x['first_call_s']:.1f} s | "
            f"{x['speedup_over_eager']:.2f}× | {x['rel_to_float64']:.1e} | {rss} |"
        )
    print()


def gpu_step_table(r) -> None:
    print(f"{r['machine']['cuda']}, torch {r['machine']['torch']}:")
    print()
    rel = any("rel_to_graph" in x for x in r["rows"])  # the compiled rows' accuracy
    print(
        "| algorithm | query images / class | convolutions | path | ms / meta-step "
        "| peak CUDA memory |" + (" meta-gradient vs graph |" if rel else "")
    )
    print("|---|---|---|---|---|---|" + ("---|" if rel else ""))
    for x in r["rows"]:
        head = f"| {x['algo']} | {x['queries']} | {x.get('conv', 'native')} | {x['variant']} |"
        if "error" in x:
            why = x["error"].splitlines()[0][:120]
            print(f"{head} failed: {why} | |" + (" |" if rel else ""))
            continue
        first = f" (first call {x['first_call_s']:.0f} s)" if "compiled" in x["variant"] else ""
        tail = f" {x['rel_to_graph']:.1e} |" if rel else ""
        print(f"{head} {x['ms']:.1f}{first} | {x.get('peak_mib', 0):.0f} MiB |{tail}")
    print()


def gpu_profile_table(r) -> None:
    extra = "".join(
        f", {label} {r[k]}"
        for k, label, default in (("compile", "compile", "off"), ("hvp_mode", "HVPs", "rev"))
        if r.get(k, default) != default
    )
    print(f"{r['machine']['cuda']}, convolutions {r.get('conv', 'native')}{extra}:")
    print()
    print("| CUDA-graph meta-step, cuDNN setting | ms |")
    print("|---|---|")
    for x in r["graph_variants"]:
        print(f"| {x['variant']} | {x['ms']:.1f} |")
    print()
    print(
        f"{'Eager' if r.get('compile', 'off') == 'off' else 'Compiled'} meta-step: "
        f"{r['kernels_per_meta_step']} kernels, "
        f"{r['summed_kernel_ms']:.1f} ms of summed kernel time."
    )
    print()


def distributed_table(r) -> None:
    print("| --compile | processes × threads | meta-steps / s | s / meta-step | first step |")
    print("|---|---|---|---|---|")
    for x in r["rows"]:
        print(
            f"| {x['compile']} | {x['processes']} × {x['threads_per_process']} | "
            f"{x['steps_per_second']:.3f} | {x['median_seconds_per_step']:.2f} | "
            f"{x['first_step_s']:.1f} s |"
        )
    print()


# (result files, table printer), in the order the tables are printed
TABLES = (
    (
        ("omniglot_5w1s_cpu_baselines",),
        partial(timed_runs_table, key="algo", label="algorithm", minutes=20, test_step=True),
    ),
    (
        ("gd_vs_newton_cg",),
        partial(
            timed_runs_table, key="inner_solver", label="inner solver", minutes=5, test_step=False
        ),
    ),
    (("inner_solvers",), inner_solvers_table),
    (("vmap_vs_loop",), vmap_vs_loop_table),
    (("hvp_modes",), hvp_modes_table),
    (
        (
            "peers",
            "peers_pieces_chunk8",
            "peers_pieces_nchw",
            "peers_pieces_nchw_2",
            "peers_pieces_solve",
            "peers_pieces_query",
            "peers_pieces_query_2",
            "peers_amd_epyc",
            "peers_amd_epyc_2",
            "peers_amd_epyc_interleaved",
            "peers_amd_epyc_interleaved_system",
        ),
        peers_table,
    ),
    (("query_per_task",), query_per_task_table),
    (("peers_float64",), peers_float64_lines),
    (("roofline",), partial(roofline_table, name="roofline")),
    (("roofline_amd_epyc",), partial(roofline_table, name="roofline_amd_epyc")),
    (("conv_layouts",), conv_layouts_table),
    (
        (
            "cpu_variants",
            "cpu_variants_minres",
            "cpu_variants_amd_epyc",
            "cpu_variants_amd_epyc_interleaved",
        ),
        cpu_variants_table,
    ),
    (("fig2b_cost", "gpu/fig2b_cost_cuda"), fig2b_table),
    (
        tuple(
            f"gpu/{n}"
            for n in (
                "gpu_step",
                "gpu_step_compiled",
                "gpu_step_h100",
                "gpu_step_solve_fwd_h200",
                "gpu_step_channels_last_h200",
            )
        ),
        gpu_step_table,
    ),
    (
        ("gpu/gpu_profile", *sorted(f"gpu/{p.stem}" for p in OUT.glob("gpu/gpu_profile_*.json"))),
        gpu_profile_table,
    ),
    (("distributed_throughput",), distributed_table),
)


def main() -> int:
    for names, table in TABLES:
        for name in names:
            r = load(name)
            if r:
                table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
