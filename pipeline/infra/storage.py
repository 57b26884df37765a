"""Atomic artifact writing and checked reading.

A stage killed mid-write leaves nothing at the output path (it writes a temporary sibling and renames
it at the end; the next writer of the same path removes temporaries whose process is gone). A
damaged artifact is refused with a message naming the file: safetensors files carry a checksum of
their tensors, Zarr stores a manifest (size and hash of every file) that is checked when they open.

torch, safetensors and zarr are imported by the functions that use them: the always-run
``eval_files`` stage writes JSON through this module, and a no-op ``dvc repro`` should not spend
1.5 s importing torch.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from pipeline.infra.fingerprint import file_hash, tensors_hash

if TYPE_CHECKING:
    import torch
    import zarr

HEADER_KEY = "dmq"  # the one safetensors metadata entry: several entries are written in random order
CHECKSUM_KEY = "tensors_sha256"
MANIFEST_KEY = "manifest"  # root attribute of a sealed Zarr store: {file: [bytes, sha256 prefix]}
REBUILD = "rebuild it by rerunning the stage that writes it"


class ArtifactError(ValueError):
    """An artifact is unreadable, damaged, or was made for something else; the message names the file."""


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Temporaries of ``path`` left by writers that were killed: their pid is in the name."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if not (pid.isdigit() and _process_alive(int(pid))):
            remove_path(tmp)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and directories (Zarr stores, ``save_pretrained`` folders). The temporary name
    sits in the same directory so the final rename is atomic on one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        remove_path(path)
        os.replace(tmp, path)
    finally:
        remove_path(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact {path} not found; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{path} is not valid JSON (truncated?): {error}; {REBUILD}") from None


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors with a JSON header (``metadata`` plus a checksum of the tensors), from wherever the
    tensors lie."""
    from safetensors.torch import save_file

    from pipeline.infra.device import host

    tensors = {k: host(v).contiguous() for k, v in tensors.items()}
    header = {**(metadata or {}), CHECKSUM_KEY: tensors_hash(tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact {path} not found; run the stage that writes it first")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ArtifactError(
            f"{path} is unreadable (truncated, or not a safetensors file): {error}; {REBUILD}"
        ) from None
    if HEADER_KEY not in metadata:
        raise ArtifactError(
            f"{path} has no header: it was not written by this pipeline (or by an older version); {REBUILD}"
        )
    header = json.loads(metadata[HEADER_KEY])
    if header.pop(CHECKSUM_KEY, None) != tensors_hash(tensors):
        raise ArtifactError(f"{path} is corrupt: its tensors do not match the checksum in its header; {REBUILD}")
    return tensors, header


def _store_files(store: Path) -> dict[str, Path]:
    """Every file of a Zarr store by relative path, except the root ``zarr.json`` (it holds the manifest)."""
    files = {p.relative_to(store).as_posix(): p for p in store.rglob("*") if p.is_file()}
    files.pop("zarr.json", None)
    return dict(sorted(files.items()))


def create_array(group: zarr.Group, name: str, **kwargs) -> zarr.Array:
    """``group.create_array`` with flat chunk keys (``c.0.0`` beside the array's ``zarr.json``).

    Zarr's default keys (``c/0/0``) give every array a directory per chunk dimension: the main job's
    stores would hold nearly twice as many directories as files, and DVC walks every output directory on
    each ``dvc repro`` and ``dvc status``. Readers need nothing: the encoding is in the metadata.
    """
    return group.create_array(name, chunk_key_encoding={"name": "default", "separator": "."}, **kwargs)


def seal_store(store: str | Path) -> None:
    """Record the size and hash of every file of a finished store in its root attributes."""
    import zarr

    store = Path(store)
    manifest = {name: [p.stat().st_size, file_hash(p)] for name, p in _store_files(store).items()}
    zarr.open_group(str(store), mode="r+").attrs[MANIFEST_KEY] = manifest


@contextmanager
def atomic_store(path: str | Path) -> Iterator[Path]:
    """:func:`atomic_path` for a Zarr store: sealed with its manifest just before the rename."""
    with atomic_path(path) as tmp:
        yield tmp
        seal_store(tmp)


def store_problems(store: Path, manifest: dict) -> list[str]:
    files = _store_files(store)
    problems = [f"{name} is missing" for name in manifest if name not in files]
    problems += [f"{name} is not in the store's manifest" for name in files if name not in manifest]
    for name, (size, digest) in manifest.items():
        if name not in files:
            continue
        found = files[name].stat().st_size
        if found != size:
            problems.append(f"{name} has {found} bytes, the manifest says {size} (truncated?)")
        elif file_hash(files[name]) != digest:
            problems.append(f"{name} does not match its checksum (corrupt)")
    return problems


def store_name(group: zarr.Group) -> str:
    """The path of an open store, for messages."""
    return str(getattr(group.store, "root", group.store))


def open_store(path: str | Path, what: str = "Zarr store", sealed: bool = True) -> zarr.Group:
    """Open a Zarr store read-only after checking it against its manifest. ``sealed=False`` also
    accepts a store without a manifest (one not written by this pipeline)."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found; run the stage that writes it first")
    try:
        root = zarr.open_group(str(path), mode="r")
        manifest = root.attrs.get(MANIFEST_KEY)
    except Exception as error:  # zarr raises several types for a damaged store
        raise ArtifactError(f"{what} {path} is unreadable: {error}; {REBUILD}") from None
    if manifest is None:
        if not sealed:
            return root
        raise ArtifactError(
            f"{what} {path} has no manifest, so it was not completely written by this pipeline "
            f"(an interrupted copy, or an older version); {REBUILD}"
        )
    problems = store_problems(path, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ArtifactError(f"{what} {path} is damaged: {problems[0]}{more}; {REBUILD}")
    return root
