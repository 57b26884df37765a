"""Running the pipeline in a temporary copy of the repository (shared by the end-to-end tests)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
REPO_ITEMS = ("pipeline", "stages", "dvc.yaml", "external", "params.yaml", "cli.py")


def dvc_stages() -> dict:
    """The stages of every dvc.yaml of the project, by name (paths relative to the repository root:
    external/dvc.yaml runs in it)."""
    from cli import PIPELINE_FILES  # external/dvc.yaml: the always-run eval_files, with a lock of its own

    files = [yaml.safe_load((ROOT / file).read_text())["stages"] for file in PIPELINE_FILES]
    return {name: spec for stages in files for name, spec in stages.items()}


def run(cmd, cwd, env=None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def imported_packages(code: str, cwd: Path = ROOT) -> set[str]:
    """The top-level packages a fresh interpreter holds after running ``code`` in ``cwd``."""
    listing = "import sys; print(' '.join({m.split('.')[0] for m in sys.modules}))"
    found = subprocess.run(
        [sys.executable, "-c", f"{code}\n{listing}"], cwd=cwd, capture_output=True, text=True, check=True
    )
    return set(found.stdout.split())


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def stale_stages(repo: Path) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], repo)))


ENTRY_SECTIONS = ("weights", "rows", "peers", "guards")  # a config's own matrix replaces the shipped one


def merge(base: dict, override: dict, replace: tuple[str, ...] = ()) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and key not in replace:
            merge(base[key], value)
        else:
            base[key] = value
    return base


def set_params(repo: Path, overrides: dict, replace: tuple[str, ...] = ()) -> None:
    """Change params.yaml; the top-level sections in ``replace`` are replaced, not merged."""
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), overrides, replace), sort_keys=False))


def set_param(repo: Path, section: str, key: str, value) -> None:
    set_params(repo, {section: {key: value}})


CACHE_TYPE = re.search(r'^\s*type = "?([^"\n]+)"?$', (ROOT / ".dvc/config").read_text(), re.M).group(1)


def init_repo(repo: Path, overrides: dict | None = None) -> Path:
    """A DVC repository (no git) with this checkout's code and params, changed by ``overrides``."""
    for item in REPO_ITEMS:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    overrides = dict(overrides or {})
    if "rows" in overrides:  # guards name rows: a matrix of its own brings its own guards, or none
        overrides.setdefault("guards", {})
    set_params(repo, overrides, replace=ENTRY_SECTIONS)
    run(["dvc", "init", "--no-scm", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    run(["dvc", "config", "cache.type", CACHE_TYPE], repo)  # the project's: outputs linked, not copied
    return repo


def reduced_params() -> dict:
    """The overrides that make the whole pipeline run in about a minute."""
    return yaml.safe_load((ROOT / "tests/reduced.yaml").read_text())


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    return dst


def tree_hash(path: Path) -> str:
    """Hash of a file, or of every file of a directory with its relative path."""
    digest = hashlib.sha256()
    for file in sorted(p for p in [path, *path.rglob("*")] if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def artifact_hashes(repo: Path) -> dict[str, str]:
    """Every artifact of a finished run (and the metrics), by path."""
    found = [
        p
        for folder in ("artifacts", "metrics")
        for p in (repo / folder).rglob("*")
        if p.is_file() or p.suffix == ".zarr"
    ]
    found = [
        p
        for p in found
        if not any(part.startswith(".") for part in p.relative_to(repo).parts)
        and ".zarr/" not in p.relative_to(repo).as_posix()
    ]
    return {p.relative_to(repo).as_posix(): tree_hash(p) for p in sorted(found)}


class TwoConvs(torch.nn.Module):
    """Stand-in for a UNet in reconstruction tests: called as model(x, t)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, t):
        return self.b(torch.relu(self.a(x)))


class Killed(Exception):
    """Stands in for a kill in the resume tests."""


def dies_on_the_second_call(real, calls: list):
    """Wrap ``real(name, ...)``: run it for the first name (recorded in ``calls``), then raise Killed."""

    def wrapper(name, *args, **kwargs):
        if calls:
            raise Killed
        calls.append(name)
        return real(name, *args, **kwargs)

    return wrapper
