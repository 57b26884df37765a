"""Content hashes that tie an artifact to the model and parameters that produced it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def model_hash(folder: str | Path) -> str:
    """Hash of the UNet weights file of a diffusers folder."""
    weights = sorted((Path(folder) / "unet").glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder}/unet has no .safetensors weights")
    return file_hash(weights[0])


def params_hash(section: dict) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_model(header: dict, expected: str, source: str) -> None:
    found = header.get("model_hash")
    if found != expected:
        raise ValueError(
            f"{source} was made for model {found}, but the current FP model is {expected}; rerun the stages that write it"
        )
