"""CUDA paths agree with the CPU ones (run by benchmarks/gpu_check.sh; skipped without CUDA)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from imaml import make_algorithm

from conftest import conv_setup, rel

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("algo", ["imaml", "maml", "fomaml", "reptile"])
def test_cuda_matches_cpu_in_float64(algo):
    out = []
    for device in ("cpu", "cuda"):
        model, theta, batch = conv_setup(torch.float64, T=4, channels=8, device=device)
        g, _ = make_algorithm(algo, model=model, inner_steps=4).meta_grad(theta, batch)
        out.append({k: v.cpu() for k, v in g.items()})
    assert rel(out[1], out[0]) < 1e-9


@cuda
def test_cuda_vmap_equals_loop_in_float32(monkeypatch):
    # in true float32: cuDNN's default TF32 convolutions (10-bit mantissa) differ between
    # the grouped (vmap) and per-task convolutions, and 16 inner steps plus the solve on
    # an indefinite system amplify that to ~10% (measured on an H100)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, theta, batch = conv_setup(torch.float32, T=4, channels=8, device="cuda")
    a = make_algorithm("imaml", model=model, inner_steps=4).meta_grad(theta, batch)[0]
    b = make_algorithm("imaml", model=model, inner_steps=4, batched=False).meta_grad(theta, batch)[
        0
    ]
    assert rel(a, b) < 1e-3


@cuda
def test_training_with_cuda_graphs_matches_eager(tmp_path):
    from imaml.config import from_preset
    from imaml.train import meta_train

    cfg = from_preset("sinusoid").replace(
        meta_steps=5, meta_batch=8, val_tasks=0, device="cuda", test_tasks=10
    )
    params = {}
    for mode in ("on", "off"):
        s = meta_train(
            cfg.replace(cuda_graph=mode), tmp_path / mode, progress=False, final_test=False
        )
        assert s["cuda_graph"]["replays"] == (5 if mode == "on" else 0)
        params[mode] = torch.load(tmp_path / mode / "last.pt", weights_only=True)["params"]
    assert rel(params["on"], params["off"]) < 1e-4


@cuda
@pytest.mark.parametrize("impl", ["unfold", "slices"])
def test_im2col_convolutions_on_cuda_match_native_on_cpu_in_float64(impl):
    from conv_variants import set_conv_impl

    out = []
    for device, conv in (("cpu", "native"), ("cuda", impl)):
        model, theta, batch = conv_setup(torch.float64, T=4, channels=8, device=device)
        set_conv_impl(model, conv)
        g, _ = make_algorithm("imaml", model=model, inner_steps=4, flat=True).meta_grad(
            theta, batch
        )
        out.append({k: v.cpu() for k, v in g.items()})
    assert rel(out[1], out[0]) < 1e-9


@cuda
@pytest.mark.parametrize("impl", ["unfold", "slices"])
def test_cuda_graph_with_im2col_convolutions_equals_eager(impl):
    from imaml.fast import MetaStep

    from conv_variants import set_conv_impl

    model, theta, batch = conv_setup(torch.float32, T=4, channels=8, device="cuda")
    set_conv_impl(model, impl)
    alg = make_algorithm("imaml", model=model, inner_steps=4, flat=True)
    step = MetaStep(alg, mode="on")
    for shift in (0.0, 0.25):  # the second call replays the captured graph on new values
        b = batch._replace(support_x=batch.support_x + shift)
        mean, _ = step(theta, b)
        ref, _ = alg.meta_grad(theta, b)
        assert rel(mean, ref) < 1e-5
    assert step.replays == 2


@cuda
def test_training_one_step_behind_on_cuda_equals_in_order(tmp_path, monkeypatch):
    """On CUDA the loop queues step t + 1 before it reads step t (pinned, asynchronous
    copies); reading each step in order gives the same run."""
    import imaml.train as tr
    from imaml.config import from_preset

    cfg = from_preset("sinusoid").replace(
        meta_steps=6, meta_batch=8, val_every=3, val_tasks=8, device="cuda", dtype="float64"
    )
    params = {}
    for behind in (True, False):
        monkeypatch.setattr(tr, "reads_one_step_behind", lambda device, b=behind: b)
        s = tr.meta_train(cfg, tmp_path / str(behind), progress=False, final_test=False)
        assert s["step"] == 6
        params[behind] = torch.load(tmp_path / str(behind) / "last.pt", weights_only=True)["params"]
    assert rel(params[True], params[False]) < 1e-12
