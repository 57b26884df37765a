"""The files the metrics read from outside the repository (reference images, Inception weights, a CLIP
folder), listed by name, size and modification time, and checked: the ``eval_files`` stage runs on every
``dvc repro`` and the preflight of every stage checks these files, so this module imports no torch."""

from __future__ import annotations

import json
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


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # older and newer transformers


def clip_folder_problem(folder: str | Path) -> str | None:
    """Why ``eval.clip_model`` cannot be read as a CLIP model and processor (None when it can): a
    transformers ``CLIPModel`` with its processor, both saved with ``save_pretrained``."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} not found (a folder with a transformers CLIPModel and its processor)"
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        missing.append("a processor (preprocessor_config.json or processor_config.json)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("model weights (*.safetensors or *.bin)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        missing.append("a tokenizer (tokenizer.json or vocab.json + merges.txt)")
    if missing:
        return f"{folder} is not a CLIP model folder: it lacks {', '.join(missing)} (save_pretrained writes them)"
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    if kind != "clip":
        return f"{folder}/config.json is a {kind!r} model, not a CLIPModel (model_type 'clip')"
    return None
