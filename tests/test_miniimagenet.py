import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from imaml.data.miniimagenet import MiniImagenetTasks, load_miniimagenet
from imaml.data.omniglot import DataError
from imaml.models import MiniImagenetConvNet


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def write_csv_copy(root, classes=6, per_class=5, size=(100, 90)):
    folder = root / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["filename,label"]
    for c in range(classes):
        for i in range(per_class):
            name = f"n0{c:07d}{i:08d}.jpg"
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                folder / "images" / name
            )
            lines.append(f"{name},n0{c:07d}")
    for split in ("train", "val", "test"):
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def write_pickle_copy(root, classes=5, per_class=4):
    folder = root / "miniimagenet"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (classes * per_class, 84, 84, 3), dtype=np.uint8)
    cd = {f"n{c:08d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(classes)}
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": data, "class_dict": cd}, f)
    return root, data, cd


def test_csv_format_loads_resizes_and_caches(tmp_path):
    root = write_csv_copy(tmp_path)
    data = load_miniimagenet(root, "train")
    assert len(data) == 6 and all(
        v.shape == (5, 3, 84, 84) and v.dtype == torch.uint8 for v in data.values()
    )
    assert list((root / "miniimagenet" / "cache").glob("*.pt"))
    again = load_miniimagenet(root, "train")
    assert all(torch.equal(data[k], again[k]) for k in data)


def test_pickle_cache_format_loads_exact_pixels(tmp_path):
    root, arr, cd = write_pickle_copy(tmp_path)
    data = load_miniimagenet(root, "train")
    first = sorted(cd)[2]
    assert torch.equal(data[first][1], torch.from_numpy(arr[cd[first][1]]).permute(2, 0, 1))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/imaml-pwned-mini",))


def test_malicious_pickle_cache_is_refused(tmp_path):
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": Evil(), "class_dict": {}}, f)
    with pytest.raises(DataError, match="refusing to load posix.system|refusing to load os.system"):
        load_miniimagenet(tmp_path, "train")
    assert not os.path.exists("/tmp/imaml-pwned-mini")


def test_missing_data_and_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="train.csv with images/"):
        load_miniimagenet(tmp_path, "train")
    root = write_csv_copy(tmp_path / "c", classes=2, per_class=2)
    (
        root / "miniimagenet" / "images" / sorted(os.listdir(root / "miniimagenet" / "images"))[0]
    ).write_bytes(b"x")
    with pytest.raises(DataError, match="is not a readable image"):
        load_miniimagenet(root, "val")
    (root / "miniimagenet" / "test.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="header"):
        load_miniimagenet(root, "test")


def test_sampler_and_network_shapes(tmp_path):
    data = load_miniimagenet(write_csv_copy(tmp_path), "train")
    tasks = MiniImagenetTasks(data, n_way=5, k_shot=1, k_query=3)
    b = tasks.sample(2, generator=torch.Generator().manual_seed(0))
    assert b.support_x.shape == (2, 5, 3, 84, 84) and b.query_x.shape == (2, 15, 3, 84, 84)
    assert torch.equal(b.query_y[0], torch.arange(5).repeat_interleave(3))
    assert all(t.is_contiguous() for t in b)  # as the compiled step's benchmarks draw them
    out = MiniImagenetConvNet(5)(b.support_x[0])
    assert out.shape == (5, 5)
    with pytest.raises(ValueError, match="exceeds"):
        MiniImagenetTasks(data, n_way=5, k_shot=3, k_query=3)
