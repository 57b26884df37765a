"""Independent jobs on one intra-op thread each: inline, or spread over forked worker processes.

torch's CPU reductions split their work by thread count, so what a learner computes depends on it. A job
that always runs on one thread gives the same bytes for any number of workers and on any core count. On the
small tensors of LES and AdaRound the time goes to per-op overhead more than to arithmetic, so more cores pay
off better as more workers than as more threads: on 2 cores one AdaRound seed of the default took 1.3x as long
on one thread as on two, yet two seeds side by side on one thread each were done in 140 s, where one after
another on two threads took 183-204 s (docs/performance.md, "Quantization seeds side by side").
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside, on as many as before outside, exception or not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


Function = TypeVar("Function", bound=Callable[..., Any])


def one_thread_on_cpu(function: Function) -> Function:
    """``function`` on one intra-op thread when its keyword argument ``device`` is the CPU (its bytes then
    do not depend on the core count, and callers use more cores as workers, :func:`per_seed`); on a GPU
    as it is."""

    @functools.wraps(function)
    def on_device(*args: Any, device: torch.device, **kwargs: Any) -> Any:
        with one_thread() if device.type == "cpu" else nullcontext():
            return function(*args, device=device, **kwargs)

    return on_device  # type: ignore[return-value]


def _start_worker(parent: int) -> None:
    """One intra-op thread; and exit when the parent process is gone (killed), instead of waiting
    forever on a queue nobody feeds."""
    torch.set_num_threads(1)

    def exit_when_orphaned():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()


def single_threaded(job: Callable, calls: list[tuple], workers: int) -> Iterator:
    """``job(*args)`` for every ``args`` of ``calls``, each on one intra-op thread; yields the results as
    they finish: inline and in order when ``workers`` is 1 (or there is one call, or no fork), else from
    ``workers`` forked processes in any order (so a result should say which call it answers).

    The workers are forked, so they inherit the caller's modules and memory copy-on-write; ``job`` and
    ``args`` travel pickled. One failed call fails the whole at once: the calls not started are dropped.
    Fork is safe here because the workers run torch single-threaded; do not use it with CUDA (a forked
    process cannot use its parent's CUDA context)."""
    if workers == 1 or len(calls) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        with one_thread():
            for args in calls:
                yield job(*args)
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        min(workers, len(calls)), mp_context=context, initializer=_start_worker, initargs=(os.getpid(),)
    ) as pool:
        futures = [pool.submit(job, *args) for args in calls]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _seed_and_result(job: Callable, args: tuple, seed: int) -> tuple[int, Any]:
    return seed, job(*args, seed)


def per_seed(job: Callable, args: tuple, seeds: list[int], workers: int, device: torch.device) -> dict[int, Any]:
    """``{seed: job(*args, seed)}`` in the order of ``seeds``: on the CPU side by side in ``workers`` forked
    processes, one thread each (:func:`single_threaded`); on a GPU one after another in this process, which
    holds the CUDA context."""
    if device.type != "cpu":
        return {seed: job(*args, seed) for seed in seeds}
    results = dict(single_threaded(_seed_and_result, [(job, args, seed) for seed in seeds], workers))
    return {seed: results[seed] for seed in seeds}
