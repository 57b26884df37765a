"""Per-unit checkpoints of a long stage, so that a rerun after a crash or a kill resumes.

A unit (an LES layer, an AdaRound block, a block of Q-Diffusion's learned activation steps in
``pts``) that finishes is written at once, atomically, as one
safetensors file in ``root/<key>/``. ``key`` hashes everything the results depend on (model and
params), so checkpoints made under other params are never reused; they are deleted when a stage
opens its checkpoints with a new key. The stage removes them once all of its outputs are written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.infra.storage import ArtifactError, read_tensors, remove_path, write_tensors

if TYPE_CHECKING:
    import torch


class Checkpoints:
    def __init__(self, root: str | Path, key: str) -> None:
        self.root = Path(root)
        self.dir = self.root / key
        if self.root.is_dir():
            for other in self.root.iterdir():
                if other != self.dir:
                    remove_path(other)
        self.dir.mkdir(parents=True, exist_ok=True)
        if done := self.done():
            print(f"resuming: {len(done)} finished units in {self.dir}", file=sys.stderr)

    def _file(self, unit: str) -> Path:
        return self.dir / f"{unit}.safetensors"

    def done(self) -> list[str]:
        return sorted(p.name.removesuffix(".safetensors") for p in self.dir.glob("*.safetensors"))

    def load(self, unit: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The unit's tensors and metadata, or None when it has not finished (or its file is damaged,
        then the unit is simply redone)."""
        path = self._file(unit)
        if not path.exists():
            return None
        try:
            return read_tensors(path)
        except ArtifactError as error:
            print(f"ignoring a damaged checkpoint: {error}", file=sys.stderr)
            path.unlink()
            return None

    def save(self, unit: str, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        write_tensors(self._file(unit), {k: v.detach().cpu() for k, v in tensors.items()}, metadata)
