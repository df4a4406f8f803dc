"""Omniglot (Lake et al. 2015): loading, validation, caching, splits and the episode sampler.

Where the data is: ``data_dir`` argument, else ``$IMAML_DATA_DIR``, else
``~/.cache/imaml/data``; Omniglot lives in ``<data dir>/omniglot/`` as the official
``images_background.zip`` and ``images_evaluation.zip`` (or their extracted folders
``images_background/<Alphabet>/characterNN/*.png``). If neither is there, the official
release is downloaded, checked against its MD5, and moved into place atomically (a
temporary file renamed only once verified: a killed download leaves nothing behind).

First load validates the release (alphabet and character counts, 20 drawings per
character, 105×105 images), resizes every drawing to 28×28 (antialiased, Lanczos),
and caches the result as one uint8 tensor file keyed by a hash of the inputs and the
preprocessing, beside the data when that folder is writable, else in the user cache.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..algorithms.base import TaskBatch
from ..models import OmniglotConvNet

PARTS = {
    "images_background": {"alphabets": 30, "characters": 964},
    "images_evaluation": {"alphabets": 20, "characters": 659},
}
BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
DRAWINGS = 20
IMAGE_SIZE = 105
SIZE = 28
PREPROCESS = f"v1:L:lanczos:{SIZE}x{SIZE}:uint8"
_PNG = re.compile(
    r"^(images_background|images_evaluation)/([^/]+)/(character\d+)/(\d+)_(\d+)\.png$"
)


class DataError(ValueError):
    """The data on disk is missing, corrupt or not laid out as the release is."""


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$IMAML_DATA_DIR``, else ``~/.cache/imaml/data``."""
    if data_dir is not None:
        root = Path(data_dir)
    elif os.environ.get("IMAML_DATA_DIR"):
        root = Path(os.environ["IMAML_DATA_DIR"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imaml" / "data"
    if root.exists() and not root.is_dir():
        raise DataError(f"data directory {root} exists but is not a folder")
    return root


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imaml" / "cache"


def writable(folder: Path) -> bool:
    """Writable, and not marked read-only by its mode bits (which root would ignore)."""
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def _hash_file(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` to ``dest`` via a temporary file in the same folder, verified, then renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            expected_len = resp.headers.get("Content-Length")
            n = 0
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                n += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected_len is not None and n != int(expected_len):
            raise DataError(f"download of {url} was cut short: {n} of {expected_len} bytes")
        for algo, want in (("md5", md5), ("sha256", sha256)):
            if want is not None:
                got = _hash_file(Path(tmp), algo)
                if got != want:
                    raise DataError(
                        f"{url}: {algo} {got} does not match the expected {want}; "
                        "the download is corrupt or not the official release"
                    )
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException) as e:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"download of {url} failed ({type(e).__name__}: {e})") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def ensure_release(
    root: Path,
    *,
    download_missing: bool = True,
    base_url: str = BASE_URL,
    md5: dict[str, str] | None = None,
) -> Path:
    """The Omniglot folder under ``root``, downloading and verifying missing parts."""
    folder = root / "omniglot"
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} exists but is not a folder")
    md5 = OFFICIAL_MD5 if md5 is None else md5
    for part in PARTS:
        if (folder / f"{part}.zip").exists() or (folder / part).is_dir():
            continue
        if not download_missing:
            raise DataError(
                f"Omniglot not found: neither {folder / (part + '.zip')} nor {folder / part}/ exists. "
                "Set --data-dir or IMAML_DATA_DIR to the folder holding omniglot/, or allow download."
            )
        print(f"downloading {part}.zip from {base_url} ...", flush=True)
        download(base_url + f"{part}.zip", folder / f"{part}.zip", md5=md5.get(part))
    return folder


def _fingerprint(folder: Path) -> str:
    """A hash of the release's bytes (zips) or names and sizes (folders), and the preprocessing."""
    h = hashlib.sha256(PREPROCESS.encode())
    for part in PARTS:
        z = folder / f"{part}.zip"
        if z.exists():
            h.update(f"{part}.zip:{_hash_file(z, 'sha256')}".encode())
        else:
            for p in sorted((folder / part).rglob("*.png")):
                h.update(f"{p.relative_to(folder)}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, z: Path) -> bytes:
    try:
        return zf.read(info)
    except Exception as e:
        raise DataError(f"{z}: member {info.filename} cannot be read ({e})") from e


def _members(folder: Path, part: str):
    """Yield (relative name, bytes loader, where) for every file of one part of the release."""
    z = folder / f"{part}.zip"
    if z.exists():
        try:
            zf = zipfile.ZipFile(z)
            bad = zf.testzip()
        except Exception as e:  # BadZipFile, OSError, EOFError, zlib.error, NotImplementedError...
            raise DataError(
                f"{z} is not a readable zip archive ({e}); delete it to re-download"
            ) from e
        if bad is not None:
            raise DataError(
                f"{z}: member {bad} is corrupt (CRC mismatch); delete the zip to re-download"
            )
        for info in zf.infolist():
            if not info.is_dir():
                yield info.filename, (lambda i=info: _read_member(zf, i, z)), f"{z}:{info.filename}"
        return
    base = folder / part
    for p in sorted(base.rglob("*")):
        if p.is_file():
            yield str(p.relative_to(folder)).replace(os.sep, "/"), p.read_bytes, str(p)


def _decode(data: bytes, where: str) -> torch.Tensor:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for a bad file
        raise DataError(f"{where} is not a readable PNG image ({e})") from e
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{where} is {img.size[0]}×{img.size[1]}, expected {IMAGE_SIZE}×{IMAGE_SIZE}"
        )
    small = img.convert("L").resize((SIZE, SIZE), Image.LANCZOS)
    return torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).reshape(SIZE, SIZE)


@dataclass(frozen=True)
class OmniglotImages:
    """All drawings at 28×28: ``images[c, d]`` is drawing d of character c (uint8, 0–255).

    Characters are ordered by (part, alphabet, character folder); ``names[c]`` is
    "part/alphabet/characterNN" and ``part_of[c]`` is 0 (background) or 1 (evaluation).
    """

    images: torch.Tensor
    names: tuple[str, ...]
    part_of: tuple[int, ...]
    fingerprint: str


def _read_release(
    folder: Path, progress: bool, expected: dict
) -> tuple[torch.Tensor, list[str], list[int]]:
    chars: dict[str, dict[int, torch.Tensor]] = {}
    from tqdm import tqdm

    for pi, part in enumerate(PARTS):
        seen_png = 0
        members = list(_members(folder, part))
        for name, load, where in tqdm(
            members, desc=f"reading {part}", disable=not progress, unit="file", leave=False
        ):
            m = _PNG.match(name)
            if m is None:
                if name.lower().endswith(".png"):
                    raise DataError(
                        f"{where}: unexpected location; expected "
                        f"{part}/<Alphabet>/characterNN/<id>_<drawer>.png"
                    )
                continue
            drawer = int(m.group(5))
            if not 1 <= drawer <= DRAWINGS:
                raise DataError(f"{where}: drawer number {drawer} outside 1..{DRAWINGS}")
            key = f"{m.group(1)}/{m.group(2)}/{m.group(3)}"
            chars.setdefault(key, {})[drawer] = (pi, _decode(load(), where))
            seen_png += 1
        if seen_png == 0:
            raise DataError(f"no Omniglot PNGs found for {part} in {folder}")
    names = sorted(chars, key=lambda k: (list(PARTS).index(k.split("/")[0]), k))
    for part, expect in expected.items():
        mine = [n for n in names if n.startswith(part + "/")]
        alphabets = {n.split("/")[1] for n in mine}
        if len(alphabets) != expect["alphabets"] or len(mine) != expect["characters"]:
            raise DataError(
                f"{folder}/{part}: found {len(alphabets)} alphabets and {len(mine)} characters, "
                f"expected {expect['alphabets']} and {expect['characters']}; the release is incomplete"
            )
    for n in names:
        if len(chars[n]) != DRAWINGS:
            raise DataError(f"{folder}/{n}: {len(chars[n])} drawings, expected {DRAWINGS}")
    images = torch.stack(
        [torch.stack([chars[n][d][1] for d in range(1, DRAWINGS + 1)]) for n in names]
    )
    part_of = [chars[n][1][0] for n in names]
    return images, names, part_of


def load_omniglot(
    data_dir=None,
    *,
    download_missing: bool = True,
    progress: bool = True,
    expected: dict | None = None,
    base_url: str = BASE_URL,
    md5: dict[str, str] | None = None,
) -> OmniglotImages:
    """Load (and on first use validate, preprocess and cache) the whole release.

    ``expected`` maps each part to its alphabet and character counts (the official
    release's by default); ``base_url`` and ``md5`` say where missing parts are
    downloaded from and what they must hash to.
    """
    folder = ensure_release(
        data_root(data_dir), download_missing=download_missing, base_url=base_url, md5=md5
    )
    fp = _fingerprint(folder)
    cache_name = f"omniglot-{SIZE}px-{fp}.pt"
    candidates = [folder / "cache" / cache_name, user_cache() / cache_name]
    if not writable(folder):
        candidates = candidates[1:]
    for path in candidates:
        if path.exists():
            try:
                blob = torch.load(path, weights_only=True)
                return OmniglotImages(
                    blob["images"], tuple(blob["names"]), tuple(blob["part_of"]), fp
                )
            except Exception:  # a damaged cache is rebuilt, never trusted
                path.unlink(missing_ok=True)
    images, names, part_of = _read_release(
        folder, progress, PARTS if expected is None else expected
    )
    blob = {"images": images, "names": names, "part_of": part_of, "preprocess": PREPROCESS}
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".omniglot.", suffix=".part")
            with os.fdopen(fd, "wb") as f:
                torch.save(blob, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            break
        except OSError:
            continue  # read-only data folder: fall back to the user cache
    return OmniglotImages(images, tuple(names), tuple(part_of), fp)


SPLITS = ("paper", "background", "authors")
# The authors' release shuffles the 1623 characters with Python's random.seed(123) for
# training and random.seed(12345) for evaluation (docs/reproduction.md)
AUTHORS_SEEDS = {"train": 123, "test": 12345}


def make_split(
    data: OmniglotImages,
    *,
    kind: str = "paper",
    seed: int = 0,
    val_classes: int = 100,
    n_train: int = 1200,
) -> dict[str, list[int]]:
    """Character indices for meta-train / validation / meta-test.

    ``paper``: all 1623 characters pooled and permuted with ``seed``; the first 1200
    are meta-training, the other 423 meta-test; the last ``val_classes`` of the 1200
    are held out for validation (model selection), so training sees 1200 − val_classes.
    ``background``: meta-train on the background alphabets (minus ``val_classes``
    characters for validation), meta-test on the evaluation alphabets.
    ``authors``: the authors' release's two permutations (Python's ``random.shuffle``
    seeded 123 for training, 12345 for evaluation; ``seed`` is not used), so that, as
    there, the test characters overlap the training ones (310 of 423). Their character
    order within an alphabet came from ``os.listdir`` and cannot be rebuilt; this one is
    sorted, so the split has their overlap, not their exact characters.
    """
    if kind not in SPLITS:
        raise ValueError(f"unknown split {kind!r}; choose one of {', '.join(SPLITS)}")
    g = torch.Generator().manual_seed(seed)
    n = len(data.names)
    if kind in ("paper", "authors") and not 0 < n_train < n:
        raise ValueError(f"n_train must be in (0, {n}), got {n_train}")
    if kind == "paper":
        perm = torch.randperm(n, generator=g).tolist()
        train_all, test = perm[:n_train], perm[n_train:]
    elif kind == "authors":
        train_all = _python_shuffle(n, AUTHORS_SEEDS["train"])[:n_train]
        test = _python_shuffle(n, AUTHORS_SEEDS["test"])[n_train:]
    else:
        bg = [i for i in range(n) if data.part_of[i] == 0]
        train_all = [bg[i] for i in torch.randperm(len(bg), generator=g).tolist()]
        test = [i for i in range(n) if data.part_of[i] == 1]
    if not 0 <= val_classes < len(train_all):
        raise ValueError(f"val_classes must be in [0, {len(train_all)}), got {val_classes}")
    cut = len(train_all) - val_classes
    return {"train": train_all[:cut], "val": train_all[cut:], "test": test}


def _python_shuffle(n: int, seed: int) -> list[int]:
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def training_classes_in_test(split: dict[str, list[int]]) -> int:
    """How many test classes a training or validation task may also draw."""
    return len(set(split["test"]) & (set(split["train"]) | set(split["val"])))


class OmniglotTasks:
    """N-way K-shot episodes with Q query drawings per class from one split.

    Each episode: N distinct characters, each given a random rotation in {0°, 90°, 180°,
    270°} (docs/paper.md; a rotated character is a new class); per character K + Q distinct
    drawings, the first K to the support set, the rest to the query set; labels are the
    position of the character in the episode (0..N−1, a random assignment). Images are
    float in [0, 1], shape (N·K, 1, 28, 28) per task, ordered by label.
    """

    loss = "cross_entropy"
    metric = "accuracy"

    def __init__(
        self,
        data: OmniglotImages,
        classes: list[int],
        *,
        n_way: int,
        k_shot: int,
        k_query: int,
        rotate: bool = True,
    ):
        if n_way < 1 or k_shot < 1 or k_query < 1:
            raise ValueError(
                f"n_way, k_shot and k_query must be >= 1, got {n_way}, {k_shot}, {k_query}"
            )
        if n_way > len(classes):
            raise ValueError(
                f"{n_way}-way tasks need {n_way} classes but the split has {len(classes)}"
            )
        if k_shot + k_query > DRAWINGS:
            raise ValueError(
                f"k_shot + k_query = {k_shot + k_query} exceeds the {DRAWINGS} "
                "drawings per Omniglot character"
            )
        self.data, self.classes = data, torch.tensor(classes)
        self.n_way, self.k_shot, self.k_query, self.rotate = n_way, k_shot, k_query, rotate

    def make_model(self, generator: torch.Generator | None = None):
        return OmniglotConvNet(self.n_way, generator=generator)

    def sample(
        self, num_tasks: int, *, generator: torch.Generator, dtype=torch.float32
    ) -> TaskBatch:
        T, N, K, Q = num_tasks, self.n_way, self.k_shot, self.k_query
        C = len(self.classes)
        cls = torch.stack([torch.randperm(C, generator=generator)[:N] for _ in range(T)])
        cls = self.classes[cls]  # (T, N) character indices
        draw = torch.argsort(torch.rand(T, N, DRAWINGS, generator=generator), dim=-1)[..., : K + Q]
        rot = (
            torch.randint(0, 4, (T, N), generator=generator)
            if self.rotate
            else torch.zeros(T, N, dtype=torch.long)
        )
        imgs = self.data.images[cls[..., None], draw]  # (T, N, K+Q, 28, 28) uint8
        out = torch.empty_like(imgs)
        for r in range(4):  # rotate each class by its own multiple of 90°
            m = rot == r
            if m.any():
                out[m] = torch.rot90(imgs[m], r, dims=(-2, -1))
        x = out.to(dtype).div_(255.0).unsqueeze(3)  # (T, N, K+Q, 1, 28, 28)
        y = torch.arange(N).view(1, N, 1).expand(T, N, K + Q)
        sx, qx = (
            x[:, :, :K].reshape(T, N * K, 1, SIZE, SIZE),
            x[:, :, K:].reshape(T, N * Q, 1, SIZE, SIZE),
        )
        sy, qy = y[:, :, :K].reshape(T, N * K), y[:, :, K:].reshape(T, N * Q)
        # contiguous: the compiled meta-step specialises on strides, and these views' would
        # differ from those of any other batch of the same shape (the benchmarks')
        return TaskBatch(*(t.contiguous() for t in (sx, sy, qx, qy)))
