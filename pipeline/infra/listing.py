"""The files the metrics read from outside the repository (reference images, Inception weights, a CLIP
folder), listed by name, size and modification time: the ``eval_files`` stage runs on every ``dvc
repro`` and imports only this module (no torch), so a no-op run stays cheap."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def reference_files(folder: str | Path) -> list[Path]:
    """The image files of ``eval.reference_images``, sorted by name; an error names the key when there
    are none."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"eval.reference_images: {folder} is not a folder of images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def reference_listing(folder: str | Path | None) -> list[list]:
    """Name, size and modification time of each reference image (empty without a folder): what makes
    the reference stage rerun when the folder's content changes, at the cost of a stat per file."""
    if folder is None:
        return []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in reference_files(folder)]


def file_listing(path: str | Path | None) -> list[list]:
    """Name, size and modification time of a file, or of each file under a folder (empty for None or a
    missing path)."""
    if path is None or not Path(path).exists():
        return []
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [
        [str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files
    ]
