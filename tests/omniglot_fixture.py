"""A tiny synthetic Omniglot release in the official layout, for loader tests."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SMALL = {
    "images_background": {"alphabets": 2, "characters": 6},
    "images_evaluation": {"alphabets": 1, "characters": 3},
}


def png_bytes(rng, size=105) -> bytes:
    img = Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255).convert("1")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def release_files(seed=0, counts=SMALL, drawings=20) -> dict[str, bytes]:
    """{relative path: PNG bytes}: 3 characters per alphabet, ``drawings`` each."""
    rng = np.random.default_rng(seed)
    files, cid = {}, 1
    for part, c in counts.items():
        per = c["characters"] // c["alphabets"]
        for a in range(c["alphabets"]):
            for ch in range(1, per + 1):
                for d in range(1, drawings + 1):
                    files[f"{part}/Alpha_{part[7]}{a}/character{ch:02d}/{cid:04d}_{d:02d}.png"] = (
                        png_bytes(rng)
                    )
                cid += 1
    return files


def write_zip(path: Path, files: dict[str, bytes], part: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in sorted(files.items()):
            if name.startswith(part + "/"):
                z.writestr(name, data)
    return path


def make_release(root: Path, *, as_zip=True, seed=0, files=None) -> Path:
    """Write root/omniglot/{images_background,images_evaluation}(.zip); return root."""
    files = release_files(seed) if files is None else files
    folder = root / "omniglot"
    for part in SMALL:
        if as_zip:
            write_zip(folder / f"{part}.zip", files, part)
        else:
            for name, data in files.items():
                if name.startswith(part + "/"):
                    p = folder / name
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(data)
    return root
