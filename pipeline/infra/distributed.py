"""Sharding work over ``torch.distributed`` ranks launched by ``torchrun`` (docs/method.md §8).

A stage calls :func:`init` once. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the
process joins the group, NCCL on CUDA (one GPU per local rank), gloo on CPU; otherwise it is a world
of one and nothing here communicates, so the library has a single code path.

Records are split in *units* that are whole chunks of the Zarr arrays they go to: each rank writes
its own chunk-aligned region of a shared store, so no two processes ever read-modify-write one
chunk file, and the store is byte-identical to a one-process run (the batches are planned the same
way whatever the number of ranks; see :func:`plan_batches`).
"""

from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from pipeline.infra.device import resolve_device
from pipeline.infra.storage import atomic_store


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def span(self, units: int) -> range:
        """This rank's contiguous share of ``units`` work units (sizes differ by at most one)."""
        per, extra = divmod(units, self.size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (self.rank < extra))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def merge(self, mine: dict) -> dict:
        """The union of every rank's dict, on every rank (values must be picklable CPU objects)."""
        if self.size == 1:
            return dict(mine)
        everyone: list[dict] = [{} for _ in range(self.size)]
        dist.all_gather_object(everyone, mine)
        return {key: value for part in everyone for key, value in part.items()}

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first and on the other ranks once it is done (e.g. a set-up that
        deletes stale files, which must not race with ranks already writing new ones)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


SINGLE = World()


def wait_limit() -> timedelta:
    """How long a rank waits for the others at a collective (``DMQ_DIST_TIMEOUT_MIN`` minutes, default
    12 hours). Ranks wait on uneven work: the last chunk of a dump, the slowest rank's LES layers before
    ``merge``, the barriers of :func:`shared_store`; NCCL's own 10 minutes would kill a healthy run."""
    return timedelta(minutes=float(os.environ.get("DMQ_DIST_TIMEOUT_MIN", 12 * 60)))


def init(device_name: str) -> tuple[World, torch.device]:
    """Join the torchrun group if there is one: (this rank's World, its device). Each CUDA rank
    takes the GPU of its ``LOCAL_RANK``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if size == 1:
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE come from torchrun's environment
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
            timeout=wait_limit(),
        )
        atexit.register(dist.destroy_process_group)
    return World(dist.get_rank(), dist.get_world_size()), device


def plan_batches(count: int, batch_size: int, chunk: int, period: int | None = None) -> list[list[tuple[int, int]]]:
    """Batches ``(start, stop)`` over ``range(count)``, grouped by chunk of ``chunk`` records.

    Batches restart at every multiple of ``period`` (e.g. one sampling step's records) and are cut
    at multiples of ``batch_size`` from there *and* at chunk boundaries, so each lies in one chunk
    and one period. The plan does not depend on the number of ranks: the float results of a model
    can depend on the composition of its batch, so every rank count must replay the same batches.
    A rank takes whole chunks (:func:`my_batches`)."""
    period = period or count
    cuts = {count, *range(0, count, chunk)}
    for origin in range(0, count, period):
        cuts.update(range(origin, min(origin + period, count), batch_size))
    cuts = sorted(cuts)
    plan: list[list[tuple[int, int]]] = []
    for start, stop in zip(cuts, cuts[1:]):
        if not plan or start % chunk == 0:
            plan.append([])
        plan[-1].append((start, stop))
    return plan


def my_batches(plan: Sequence[list[tuple[int, int]]], world: World) -> list[tuple[int, int]]:
    """The batches of this rank's chunks."""
    mine = world.span(len(plan))
    return [batch for group in plan[mine.start : mine.stop] for batch in group]


@contextmanager
def shared_store(path: str | Path, world: World) -> Iterator[Path]:
    """:func:`pipeline.infra.storage.atomic_store` for all ranks: rank 0 picks the temporary path and, after
    every rank has left the block, seals the store with its manifest and renames it into place.

    If a rank fails inside the block the others wait at the barrier until torchrun stops them
    all (it does when one rank exits with an error); the temporary store is then removed by the
    next writer, as for a killed one-process stage."""
    if world.size == 1:
        with atomic_store(path) as tmp:
            yield tmp
        return
    if world.main:
        with atomic_store(path) as tmp:
            world.broadcast(str(tmp))
            yield tmp
            world.barrier()  # every rank's region is written
        world.barrier()  # the sealed store is in place for every rank
    else:
        tmp = Path(world.broadcast(None))
        yield tmp
        world.barrier()
        world.barrier()
