"""Content hashes that tie an artifact to the model and parameters that produced it.

Every artifact header carries a *provenance*: the hash of the FP model, the values of the parameters
that went into it (its own stage's and every upstream stage's, flattened to dotted keys), their hash,
and the seeds among them. A stage that reads an artifact recomputes the provenance it expects from
the current parameters and refuses a stale one, naming the parameter that differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import torch


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes: a safetensors file's own checksum."""
    import torch  # here, not at the top: the storage module's JSON writers must not import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_hash(folder: str | Path) -> str:
    """Hash of the UNet weights file of a diffusers folder."""
    weights = sorted((Path(folder) / "unet").glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder}/unet has no .safetensors weights")
    return file_hash(weights[0])


def params_hash(section: dict) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_values(config: dict, keys: Iterable[str]) -> dict[str, Any]:
    """The leaves of ``config`` (a JSON-like dict) under each dotted key, flattened to dotted keys:
    ``les`` gives ``les.iters``, ``les.lr``, …; ``quant.weight_clip_p`` gives itself."""

    def leaves(prefix: str, value: Any):
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from leaves(f"{prefix}.{key}", inner)
        else:
            yield prefix, value

    flat = {}
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        flat.update(leaves(key, value))
    return dict(sorted(flat.items()))


def provenance(params: dict[str, Any], model: str | None) -> dict:
    """Header fields that say what produced an artifact (``model`` is None for artifacts that do not
    depend on the FP model)."""
    return {
        "model_hash": model,
        "params_hash": params_hash(params),
        "params": params,
        "seeds": {key: value for key, value in params.items() if key.rsplit(".", 1)[-1] in {"seed", "seeds"}},
    }


def check_same_model(header: dict, expected: str, source: str) -> None:
    found = header.get("model_hash")
    if found != expected:
        raise ValueError(
            f"{source} was made for model {found}, but the current FP model is {expected}; rerun the stages that "
            "write it"
        )


def check_provenance(header: dict, expected: dict, source: str) -> None:
    """Refuse an artifact made from another model or other parameters than ``expected`` describes."""
    if "params_hash" not in header:
        raise ValueError(
            f"{source} has no provenance in its header (an older version of the pipeline wrote it); rebuild it"
        )
    if expected["model_hash"] is not None:
        check_same_model(header, expected["model_hash"], source)
    if header["params_hash"] == expected["params_hash"]:
        return
    made, now = header.get("params", {}), expected["params"]
    differences = [
        f"{key} = {made.get(key, '(absent)')!r} there, {now.get(key, '(absent)')!r} now"
        for key in sorted(set(made) | set(now))
        if made.get(key) != now.get(key)
    ]
    more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
    raise ValueError(
        f"{source} was made with other parameters than the current ones: "
        f"{differences[0] if differences else 'hash differs'}"
        f"{more}; rebuild it by rerunning the stage that writes it"
    )
