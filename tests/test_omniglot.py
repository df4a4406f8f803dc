import hashlib
import http.server
import os
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from imaml.data.omniglot import (
    DataError,
    OmniglotTasks,
    data_root,
    download,
    load_omniglot,
    make_split,
)

from conftest import REAL_DATA, needs_real
from omniglot_fixture import SMALL, make_release, png_bytes, release_files, write_zip


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def load(root, **kw):
    return load_omniglot(root, expected=SMALL, progress=False, download_missing=False, **kw)


@pytest.mark.parametrize("as_zip", [True, False])
def test_loads_zips_and_folders_alike(tmp_path, as_zip):
    data = load(make_release(tmp_path / "d", as_zip=as_zip))
    assert data.images.shape == (9, 20, 28, 28) and data.images.dtype == torch.uint8
    assert data.part_of.count(0) == 6 and data.part_of.count(1) == 3
    assert data.names[0].startswith("images_background/")
    ref = load(make_release(tmp_path / "z", as_zip=not as_zip))
    assert torch.equal(data.images, ref.images)


def test_cache_is_written_beside_data_and_reused(tmp_path):
    root = make_release(tmp_path / "d")
    first = load(root)
    cached = list((root / "omniglot" / "cache").glob("*.pt"))
    assert len(cached) == 1
    second = load(root)
    assert torch.equal(first.images, second.images) and first.fingerprint == second.fingerprint


def test_read_only_data_folder_caches_in_user_cache(tmp_path):
    root = make_release(tmp_path / "d")
    folder = root / "omniglot"
    os.chmod(folder, 0o555)
    try:
        load(root)
        assert not (folder / "cache").exists()
        assert list((tmp_path / "xdg" / "imaml" / "cache").glob("*.pt"))
    finally:
        os.chmod(folder, 0o755)


def test_damaged_cache_is_rebuilt(tmp_path):
    root = make_release(tmp_path / "d")
    ref = load(root)
    (cache,) = (root / "omniglot" / "cache").glob("*.pt")
    cache.write_bytes(b"garbage")
    assert torch.equal(load(root).images, ref.images)


def test_cache_key_changes_with_the_data(tmp_path):
    a = load(make_release(tmp_path / "a", seed=0))
    b = load(make_release(tmp_path / "b", seed=1))
    assert a.fingerprint != b.fingerprint


def test_missing_data_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="IMAML_DATA_DIR"):
        load(tmp_path)


def test_data_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load(f)


def test_data_root_prefers_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAML_DATA_DIR", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("IMAML_DATA_DIR")
    assert data_root() == tmp_path / "xdg" / "imaml" / "data"


def corrupt(tmp_path, mutate):
    files = release_files()
    mutate(files)
    return make_release(tmp_path / "bad", files=files)


def test_png_that_is_not_png_names_the_file(tmp_path):
    name = "images_background/Alpha_b0/character02/0002_07.png"
    root = corrupt(tmp_path, lambda f: f.__setitem__(name, b"not a png"))
    with pytest.raises(DataError, match="character02/0002_07.png.*not a readable PNG"):
        load(root)


def test_wrong_image_size_names_the_file(tmp_path):
    import numpy as np

    name = "images_evaluation/Alpha_e0/character01/0007_03.png"
    root = corrupt(tmp_path, lambda f: f.__setitem__(name, png_bytes(np.random.default_rng(0), 64)))
    with pytest.raises(DataError, match="0007_03.png is 64×64"):
        load(root)


def test_missing_alphabet_is_reported(tmp_path):
    root = corrupt(tmp_path, lambda f: [f.pop(k) for k in list(f) if "Alpha_b1" in k])
    with pytest.raises(DataError, match="found 1 alphabets and 3 characters, expected 2 and 6"):
        load(root)


def test_missing_drawing_is_reported(tmp_path):
    root = corrupt(tmp_path, lambda f: f.pop("images_background/Alpha_b0/character01/0001_20.png"))
    with pytest.raises(DataError, match="character01: 19 drawings"):
        load(root)


def test_truncated_zip_is_reported(tmp_path):
    root = make_release(tmp_path / "d")
    z = root / "omniglot" / "images_background.zip"
    z.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
    with pytest.raises(DataError, match="images_background.zip"):
        load(root)


def test_empty_folder_is_reported(tmp_path):
    (tmp_path / "e" / "omniglot" / "images_background").mkdir(parents=True)
    (tmp_path / "e" / "omniglot" / "images_evaluation").mkdir(parents=True)
    with pytest.raises(DataError, match="no Omniglot PNGs"):
        load(tmp_path / "e")


# -- download from a local HTTP server ---------------------------------------------


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    behaviour = {"cut": None}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *a):
            pass

        def do_GET(self):
            if behaviour["cut"] is None:
                return super().do_GET()
            data = (served / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: behaviour["cut"]])  # then close: a cut-off transfer

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/", behaviour
    httpd.shutdown()
    httpd.server_close()


def _serve_release(served):
    files = release_files()
    md5 = {}
    for part in SMALL:
        p = write_zip(served / f"{part}.zip", files, part)
        md5[part] = hashlib.md5(p.read_bytes()).hexdigest()
    return md5


def test_download_verifies_and_loads(tmp_path, server):
    served, url, _ = server
    md5 = _serve_release(served)
    data = load_omniglot(tmp_path / "dl", expected=SMALL, progress=False, base_url=url, md5=md5)
    assert data.images.shape == (9, 20, 28, 28)
    names = sorted(p.name for p in (tmp_path / "dl" / "omniglot").iterdir())
    assert names == ["cache", "images_background.zip", "images_evaluation.zip"]


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, server):
    served, url, _ = server
    md5 = _serve_release(served)
    md5["images_evaluation"] = "0" * 32
    with pytest.raises(DataError, match="md5 .* does not match"):
        load_omniglot(tmp_path / "dl", expected=SMALL, progress=False, base_url=url, md5=md5)
    left = sorted(p.name for p in (tmp_path / "dl" / "omniglot").iterdir())
    assert left == ["images_background.zip"]  # the verified part stays; no partial file


def test_cut_off_download_leaves_nothing(tmp_path, server):
    served, url, behaviour = server
    _serve_release(served)
    behaviour["cut"] = 100
    with pytest.raises(DataError, match="images_background.zip"):
        download(url + "images_background.zip", tmp_path / "x" / "images_background.zip")
    assert list((tmp_path / "x").iterdir()) == []


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="download of .* failed"):
        download("http://127.0.0.1:9/none.zip", tmp_path / "none.zip", timeout=2)
    assert list(tmp_path.iterdir()) == []


# -- splits and the episode sampler --------------------------------------------------


@pytest.fixture
def small(tmp_path):
    return load(make_release(tmp_path / "d"))


def test_paper_split_is_a_seeded_partition(small):
    s = make_split(small, kind="paper", seed=3, val_classes=1, n_train=6)
    assert len(s["train"]) == 5 and len(s["val"]) == 1 and len(s["test"]) == 3
    assert sorted(s["train"] + s["val"] + s["test"]) == list(range(9))
    assert s == make_split(small, kind="paper", seed=3, val_classes=1, n_train=6)
    assert s != make_split(small, kind="paper", seed=4, val_classes=1, n_train=6)


def test_background_split_tests_on_evaluation_alphabets(small):
    s = make_split(small, kind="background", seed=0, val_classes=2)
    assert all(small.part_of[i] == 0 for i in s["train"] + s["val"])
    assert all(small.part_of[i] == 1 for i in s["test"]) and len(s["test"]) == 3
    assert not set(s["train"]) & set(s["val"])


def test_authors_split_reuses_their_two_permutations(small):
    import random

    s = make_split(small, kind="authors", val_classes=1, n_train=6)
    train_perm, test_perm = list(range(9)), list(range(9))
    random.Random(123).shuffle(train_perm)
    random.Random(12345).shuffle(test_perm)
    assert s["train"] + s["val"] == train_perm[:6] and s["test"] == test_perm[6:]
    assert s == make_split(small, kind="authors", seed=7, val_classes=1, n_train=6)


@needs_real
def test_authors_split_overlaps_as_theirs_and_eval_records_it(tmp_path):
    """310 of the 423 test characters of the authors' split are training characters
    (the overlap their evaluation script has); the paper split has none; eval.json says so."""
    from imaml.config import from_preset
    from imaml.train import evaluate_run, meta_train

    data = load_omniglot(REAL_DATA, progress=False)
    authors = make_split(data, kind="authors", val_classes=100)
    assert len(authors["test"]) == 423 and len(authors["train"]) == 1100
    assert len(set(authors["test"]) & set(authors["train"] + authors["val"])) == 310
    paper = make_split(data, kind="paper", seed=0, val_classes=100)
    assert not set(paper["test"]) & set(paper["train"] + paper["val"])
    for split, disjoint in (("paper", True), ("authors", False)):
        cfg = from_preset(
            "omniglot-5w1s",
            algo="fomaml",
            split=split,
            meta_steps=1,
            inner_steps=1,
            val_tasks=0,
            meta_batch=2,
            data_dir=REAL_DATA,
        )
        meta_train(cfg, tmp_path / split, progress=False, final_test=False)
        res = evaluate_run(tmp_path / split, tasks=2)
        assert res["disjoint_test_classes"] is disjoint
        assert res["test_classes_in_training"] == (0 if disjoint else 310)


def test_bad_split_arguments(small):
    with pytest.raises(ValueError, match="unknown split"):
        make_split(small, kind="vinyals2")
    with pytest.raises(ValueError, match="val_classes"):
        make_split(small, kind="paper", val_classes=6, n_train=6)


def test_sampler_invariants(small):
    tasks = OmniglotTasks(small, [0, 1, 2, 3, 4], n_way=3, k_shot=2, k_query=4)
    b = tasks.sample(7, generator=torch.Generator().manual_seed(0))
    assert b.support_x.shape == (7, 6, 1, 28, 28) and b.query_x.shape == (7, 12, 1, 28, 28)
    assert b.support_x.min() >= 0 and b.support_x.max() <= 1
    assert torch.equal(b.support_y[0], torch.tensor([0, 0, 1, 1, 2, 2]))
    assert set(b.query_y.unique().tolist()) == {0, 1, 2}
    # support and query drawings of a class are distinct: no query image equals a support image
    for t in range(7):
        for c in range(3):
            s = b.support_x[t][b.support_y[t] == c]
            q = b.query_x[t][b.query_y[t] == c]
            assert not any(torch.equal(si, qi) for si in s for qi in q)
    again = tasks.sample(7, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(b, again, strict=True))
    other = tasks.sample(7, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(b.support_x, other.support_x)


@pytest.mark.parametrize(("k_shot", "k_query"), [(1, 1), (2, 4)])
def test_sampled_batches_are_contiguous(small, k_shot, k_query):
    """The compiled meta-step specialises on strides: a batch drawn in training must look
    like any other of its shape (with one image per class a slice of the drawings would
    otherwise stay a strided view)."""
    tasks = OmniglotTasks(small, [0, 1, 2, 3, 4], n_way=3, k_shot=k_shot, k_query=k_query)
    b = tasks.sample(4, generator=torch.Generator().manual_seed(0))
    assert all(t.is_contiguous() for t in b)


def test_sampler_only_uses_its_split_classes(small):
    tasks = OmniglotTasks(small, [6, 7, 8], n_way=3, k_shot=1, k_query=1, rotate=False)
    b = tasks.sample(4, generator=torch.Generator().manual_seed(0))
    allowed = small.images[[6, 7, 8]].float().div(255).reshape(-1, 28, 28)
    for img in b.support_x.reshape(-1, 28, 28):
        assert any(torch.equal(img, a) for a in allowed)


def test_sampler_rejects_impossible_tasks(small):
    with pytest.raises(ValueError, match="need 6 classes"):
        OmniglotTasks(small, [0, 1, 2], n_way=6, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match="exceeds the 20"):
        OmniglotTasks(small, [0, 1, 2], n_way=2, k_shot=15, k_query=6)


@needs_real
def test_real_release_loads_with_official_counts():
    data = load_omniglot(progress=False, download_missing=False)
    assert data.images.shape == (1623, 20, 28, 28)
    s = make_split(data)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (1100, 100, 423)
    with zipfile.ZipFile(Path(REAL_DATA) / "omniglot" / "images_background.zip") as z:
        assert sum(n.endswith(".png") for n in z.namelist()) == 19280
