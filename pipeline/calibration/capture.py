"""Capture: calibration records through a network, keeping what chosen units see and give.

One mechanism for every reader of activations (docs/method.md §1): the dump (the layer I/O it stores),
the stats stage, LES (every layer's FP input and output in float32), AdaRound (block inputs of the
weight-quantized network, FP block outputs) and activation calibration (the inputs each activation
quantizer sees). As in the reference implementations nothing per layer is read back from disk: the
records ``(x_t, t[, cond])`` are replayed and forward hooks keep what is needed, a window of
consecutive units at a time, each forward pass stopped once the window's last unit has run.

Where captures live is a budget (:class:`Budget`): the first ``device_bytes`` of a window on the
device, the next ``host_bytes`` in host memory (pinned on CUDA, so copies to the device overlap; charged
the power of two the pinned allocator takes), anything beyond in a memory-mapped scratch file, so one
unit larger than memory still runs. Readers gather their batches from wherever a capture lies.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from pipeline.config import CaptureConfig

GB = 1 << 30


class _Stop(Exception):
    """Ends a forward pass early: everything the window needs has been captured."""


def run_batches(
    model: nn.Module,
    inputs,
    batch_size: int,
    before_each: Callable[[int, int], None] = lambda start, count: None,
    device: torch.device | None = None,
) -> None:
    """``model`` over ``inputs`` = (x, t) or (x, t, cond) in batches (moved to ``device`` if given);
    ``before_each(start, count)`` names each batch's records; a hook may end a pass with _Stop."""
    for start in range(0, len(inputs[0]), batch_size):
        batch = [v[start : start + batch_size] for v in inputs]
        before_each(start, len(batch[0]))
        try:
            model(*(v if device is None else v.to(device) for v in batch))
        except _Stop:
            pass


@contextmanager
def observing(
    modules: dict[str, nn.Module], observe: Callable, stop_after: str | None = None, before: bool = False
) -> Iterator[None]:
    """``observe(name, module, args, output)`` after every call of every named module (``before``:
    ahead of the call, output None); with ``stop_after``, the forward pass ends once that module has
    been observed."""

    def hook(name):
        def post(module, args, output=None):
            observe(name, module, args, output)
            if name == stop_after:
                raise _Stop

        return post

    register = "register_forward_pre_hook" if before else "register_forward_hook"
    handles = [getattr(module, register)(hook(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_io(layers: dict[str, nn.Module]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{name: (input, output)}`` of each layer's last call inside the block."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with observing(layers, lambda name, m, args, out: captured.__setitem__(name, (args[0].detach(), out.detach()))):
        yield captured


@torch.no_grad()
def execution_order(modules: dict[str, nn.Module], run_once: Callable[[], None]) -> list[str]:
    """The names of ``modules`` that a forward pass (``run_once``) reaches, in the order it first does."""
    order: dict[str, int] = {}

    def first_call(name):
        def pre(module, args):  # returns None: a pre-hook's return value would replace the inputs
            order.setdefault(name, len(order))

        return pre

    handles = [m.register_forward_pre_hook(first_call(n)) for n, m in modules.items()]
    try:
        run_once()
    finally:
        for handle in handles:
            handle.remove()
    return sorted(order, key=order.get)


@torch.no_grad()
def io_numel(model: nn.Module, layers: dict[str, nn.Module], one_record) -> dict[str, tuple[int, int]]:
    """Per layer, the elements of one record's input and output, from a pass over ``one_record``
    (model inputs of batch 1; on the meta device nothing is allocated or computed)."""
    found = {}
    with observing(layers, lambda name, m, args, out: found.setdefault(name, (args[0].numel(), out.numel()))):
        model(*one_record)
    return found


@dataclass(frozen=True)
class Budget:
    """Bytes of captures kept on the device, then in host memory; beyond both, in ``scratch``
    (a folder for memory-mapped files; the system's temporary folder when None)."""

    device_bytes: int
    host_bytes: int
    scratch: str | None = None

    @classmethod
    def of(cls, device_gb: float, host_gb: float, scratch: str | None = None) -> Budget:
        return cls(int(device_gb * GB), int(host_gb * GB), scratch)

    @classmethod
    def from_config(cls, capture: CaptureConfig) -> Budget:
        """The budget of params' ``capture`` section, the one every stage and prediction uses."""
        return cls.of(capture.device_gb, capture.host_gb, capture.scratch)

    def halved(self) -> Budget:
        """Half of each place: a block-wise phase keeps a unit's inputs in one half and the FP targets
        of a window of units in the other, so both fit the budget at once."""
        return Budget(self.device_bytes // 2, self.host_bytes // 2, self.scratch)

    @property
    def window_bytes(self) -> int:
        return self.device_bytes + self.host_bytes


def windows(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """``names`` cut into runs of consecutive names whose ``sizes`` add up to at most ``limit``
    (a name larger than ``limit`` alone)."""
    cut, total = [[]], 0
    for name in names:
        if cut[-1] and total + sizes[name] > limit:
            cut.append([])
            total = 0
        cut[-1].append(name)
        total += sizes[name]
    return cut if cut[-1] else []


def pinned_bytes(nbytes: int) -> int:
    """What a pinned host tensor of ``nbytes`` takes: torch's pinned allocator rounds every request up to a
    power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


class _Allocator:
    """Uninitialised tensors placed by :class:`Budget` in the order they are asked for."""

    def __init__(self, budget: Budget, device: torch.device, scratch: Path) -> None:
        self.budget, self.device, self.scratch, self.used, self.files = budget, device, scratch, 0, 0
        self.pinned = device.type == "cuda"  # host captures are pinned for CUDA, so copies overlap with its work

    def place(self, nbytes: int) -> str:
        """Where the next capture of ``nbytes`` goes: "device", "host" or "scratch". A pinned capture is
        charged what the pinned allocator takes, so the host part of the budget holds as memory used."""
        if self.used + nbytes <= self.budget.device_bytes:
            self.used += nbytes
            return "device"
        self.used += pinned_bytes(nbytes) if self.pinned else nbytes
        return "host" if self.used <= self.budget.window_bytes else "scratch"

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        where = self.place(math.prod(shape) * dtype.itemsize)
        if where == "device":
            return torch.empty(shape, dtype=dtype, device=self.device)
        if where == "host":
            return torch.empty(shape, dtype=dtype, pin_memory=self.pinned)
        self.files += 1
        path = self.scratch / f"capture-{self.files}.bin"
        array = np.memmap(path, dtype=torch.empty((), dtype=dtype).numpy().dtype, mode="w+", shape=shape)
        return torch.from_numpy(array)


def batched(value) -> bool:
    """A tensor with a batch dimension (captures gather and index these by record)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0


def gather(capture, index: tuple[torch.Tensor, torch.Tensor], device: torch.device):
    """Records ``index`` = (on the host, on ``device``) of a capture (a tensor or a tree of them), on
    ``device``: captures lie on the device, in host memory or in scratch files as :class:`Budget` placed
    them, and only the batch travels, never a whole capture."""

    def rows(v):
        if not batched(v):
            return v
        if v.device.type == device.type:
            return v[index[1]]
        return v[index[0]].to(device, non_blocking=True)

    return tree_map(rows, capture)


class _Rows:
    """One capture of every record from per-batch captures (a tensor, or a tree of them such as a
    call's (args, kwargs)): each tensor with a batch dimension is written into a tensor holding every
    record's rows, placed by the allocator; anything else is taken from the first batch. A tensor with
    k rows a record (a classifier-free-guidance pair) keeps them as the batches had them."""

    def __init__(self, allocate: _Allocator, records: int) -> None:
        self.allocate, self.records, self.tree = allocate, records, None

    def put(self, value, start: int, count: int) -> None:
        """Write ``value``, the capture of records ``start`` to ``start + count``."""
        for v in tree_leaves(value):
            if batched(v) and len(v) % count:
                raise ValueError(f"a captured tensor of {len(v)} rows in a batch of {count} records")
        if self.tree is None:
            self.tree = tree_map(
                lambda v: (
                    self.allocate.empty((v.shape[0] // count * self.records, *v.shape[1:]), v.dtype)
                    if batched(v)
                    else v
                ),
                value,
            )

        def write(store, v):
            if batched(v):
                rows = v.shape[0] // count
                store[rows * start : rows * (start + count)] = v

        tree_map(write, self.tree, value)


@contextmanager
def placement(budget: Budget, device: torch.device) -> Iterator[_Allocator]:
    """An allocator placing captures by ``budget``; its scratch files are removed when the block exits."""
    with tempfile.TemporaryDirectory(prefix="capture-", dir=budget.scratch) as scratch:
        yield _Allocator(budget, device, Path(scratch))


@torch.no_grad()
def unit_inputs(model: nn.Module, unit: nn.Module, inputs, batch_size: int, allocate: _Allocator):
    """``unit``'s call (args, kwargs) over every record, each forward pass stopped as the unit is reached."""
    kept, batch = _Rows(allocate, len(inputs[0])), {}

    def pre(module, args, kwargs):
        kept.put((args, kwargs), **batch)
        raise _Stop

    handle = unit.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        run_batches(model, inputs, batch_size, lambda start, count: batch.update(start=start, count=count))
    finally:
        handle.remove()
    return kept.tree


@torch.no_grad()
def unit_outputs(model: nn.Module, units: dict[str, nn.Module], inputs, batch_size: int, allocate: _Allocator) -> dict:
    """The output of each of ``units`` (given in execution order) over every record: one forward pass a
    batch, stopped once the last of them has run. Outputs are copied as they come, so that the rest of
    the pass cannot change them in place; a unit called twice in a pass keeps its first call's."""
    kept = {name: _Rows(allocate, len(inputs[0])) for name in units}
    batch, called = {}, set()

    def next_batch(start: int, count: int) -> None:
        batch.update(start=start, count=count)
        called.clear()

    def observe(name, module, args, output):
        if name not in called:
            called.add(name)
            kept[name].put(output, **batch)

    with observing(units, observe, stop_after=next(reversed(units))):
        run_batches(model, inputs, batch_size, next_batch)
    return {name: rows.tree for name, rows in kept.items()}


@contextmanager
def layer_io(
    model: nn.Module,
    layers: dict[str, nn.Module],
    inputs,
    batch_size: int,
    budget: Budget,
    device: torch.device,
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Every record's input and output of each of ``layers`` (consecutive, in execution order; one
    call per record and forward pass), as ``{name: (inputs, outputs)}`` in the model's dtype, placed
    by ``budget``. The forward passes run on ``device`` and stop after the last layer; scratch files
    are removed when the block exits."""
    batch = {}

    def observe(name, module, args, output):
        kept[name].put((args[0], output), **batch)

    with placement(budget, device) as allocate:
        kept = {name: _Rows(allocate, len(inputs[0])) for name in layers}
        with torch.no_grad(), observing(layers, observe, stop_after=next(reversed(layers))):
            run_batches(model, inputs, batch_size, lambda start, count: batch.update(start=start, count=count), device)
        yield {name: rows.tree for name, rows in kept.items()}
