"""Capture: calibration records through a network, keeping what chosen units see and give.

One mechanism for every reader of activations (DESIGN.md §12): the dump (the layer I/O it stores),
the stats stage, LES (every layer's FP input and output in float32), AdaRound (block inputs of the
weight-quantized network, FP block outputs) and activation calibration (the inputs each activation
quantizer sees). As in the reference implementations nothing per layer is read back from disk: the
records ``(x_t, t[, cond])`` are replayed and forward hooks keep what is needed, a window of
consecutive units at a time, each forward pass stopped once the window's last unit has run.

Where captures live is a budget (:class:`Budget`): the first ``device_bytes`` of a window on the
device, the next ``host_bytes`` in host memory (pinned on CUDA, so copies to the device overlap),
anything beyond in a memory-mapped scratch file, so one unit larger than memory still runs.
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
from torch.utils._pytree import tree_map

GB = 1 << 30


class _Stop(Exception):
    """Ends a forward pass early: everything the window needs has been captured."""


def run_batches(model: nn.Module, inputs, batch_size: int, before_each: Callable[[], None] = lambda: None) -> None:
    """``model`` over ``inputs`` = (x, t) or (x, t, cond) in batches; a hook may end a pass with _Stop."""
    for start in range(0, len(inputs[0]), batch_size):
        before_each()
        try:
            model(*(v[start : start + batch_size] for v in inputs))
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


@torch.no_grad()
def unit_inputs(model: nn.Module, unit: nn.Module, inputs, batch_size: int) -> list:
    """``unit``'s call (args, kwargs) in each batch, each forward pass stopped as the unit is reached."""
    kept = []

    def pre(module, args, kwargs):
        kept.append((args, kwargs))
        raise _Stop

    handle = unit.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        run_batches(model, inputs, batch_size)
    finally:
        handle.remove()
    return kept


@torch.no_grad()
def unit_outputs(model: nn.Module, units: dict[str, nn.Module], inputs, batch_size: int) -> dict[str, list]:
    """The output of each of ``units`` (given in execution order) in each batch: one forward pass a
    batch, stopped once the last of them has run. Outputs are copied, so that the rest of the pass
    cannot change them in place; a unit called twice in a pass keeps its first call's."""
    kept: dict[str, list] = {name: [] for name in units}
    called: set[str] = set()

    def observe(name, module, args, output):
        if name not in called:
            called.add(name)
            kept[name].append(tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, output))

    with observing(units, observe, stop_after=next(reversed(units))):
        run_batches(model, inputs, batch_size, before_each=called.clear)
    return kept


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


class _Allocator:
    """Zero-filled tensors placed by :class:`Budget` in the order they are asked for."""

    def __init__(self, budget: Budget, device: torch.device, scratch: Path) -> None:
        self.budget, self.device, self.scratch, self.used, self.files = budget, device, scratch, 0, 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        self.used += nbytes
        if self.used <= self.budget.device_bytes:
            return torch.empty(shape, dtype=dtype, device=self.device)
        if self.used <= self.budget.window_bytes:
            return torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        self.files += 1
        path = self.scratch / f"capture-{self.files}.bin"
        array = np.memmap(path, dtype=torch.empty((), dtype=dtype).numpy().dtype, mode="w+", shape=shape)
        return torch.from_numpy(array)


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
    n, last = len(inputs[0]), next(reversed(layers))
    with tempfile.TemporaryDirectory(prefix="capture-", dir=budget.scratch) as scratch:
        allocate = _Allocator(budget, device, Path(scratch))
        kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        start = 0

        def observe(name, module, args, output):
            if name not in kept:
                x = args[0]
                kept[name] = (
                    allocate.empty((n, *x.shape[1:]), x.dtype),
                    allocate.empty((n, *output.shape[1:]), x.dtype),
                )
            for store, value in zip(kept[name], (args[0], output)):
                store[start : start + len(value)] = value

        with torch.no_grad(), observing(layers, observe, stop_after=last):
            for start in range(0, n, batch_size):
                try:
                    model(*(v[start : start + batch_size].to(device) for v in inputs))
                except _Stop:
                    pass
        yield kept
