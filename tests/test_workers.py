"""Independent jobs on one thread each, inline or in forked workers (pipeline/infra/workers.py): the same
results either way, on one thread, the caller's thread count back afterwards, failures raised; the
quantization seeds side by side on the CPU and in the caller's process on a GPU."""

import os

import pytest
import torch

from pipeline.infra.workers import one_thread_on_cpu, per_seed, single_threaded


def _weight_gradient(seed: int) -> tuple[int, int, int, bytes]:
    """A convolution's weight gradient (a reduction over batch and positions, split by thread count)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, 12, 12, generator=generator)
    weight = torch.randn(8, 8, 3, 3, generator=generator, requires_grad=True)
    torch.nn.functional.conv2d(x, weight, padding=1).square().sum().backward()
    return seed, torch.get_num_threads(), os.getpid(), weight.grad.numpy().tobytes()


def _fails_on_one(seed: int) -> int:
    if seed == 1:
        raise ValueError(f"seed {seed} failed")
    return seed


def test_jobs_give_the_same_bytes_inline_and_in_workers_each_on_one_thread():
    threads = torch.get_num_threads()
    inline = list(single_threaded(_weight_gradient, [(0,), (1,), (2,)], workers=1))
    assert [seed for seed, *_ in inline] == [0, 1, 2]  # in order
    assert {pid for *_, pid, _ in inline} == {os.getpid()}
    forked = {seed: rest for seed, *rest in single_threaded(_weight_gradient, [(0,), (1,), (2,)], workers=2)}
    assert os.getpid() not in {pid for _, pid, _ in forked.values()}
    for seed, ran_on, _, grad in inline:
        assert ran_on == 1 and forked[seed][0] == 1
        assert forked[seed][2] == grad
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_job_fails_the_call(workers):
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="seed 1 failed"):
        list(single_threaded(_fails_on_one, [(0,), (1,), (2,)], workers))
    assert torch.get_num_threads() == threads


def _where(tag: str, seed: int) -> tuple[str, int, int, int]:
    return tag, seed, os.getpid(), torch.get_num_threads()


@pytest.fixture
def two_threads():
    """Two intra-op threads in this process (pytest-xdist may give it one), one afterwards as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_per_seed_spreads_the_seeds_over_workers_on_the_cpu_and_answers_in_their_order(two_threads):
    results = per_seed(_where, ("job",), [2, 0, 1], workers=3, device=torch.device("cpu"))
    assert list(results) == [2, 0, 1]
    assert all(tag == "job" and ran == seed for seed, (tag, ran, _, _) in results.items())
    assert os.getpid() not in {pid for _, _, pid, _ in results.values()}
    assert {threads for *_, threads in results.values()} == {1}


def test_per_seed_runs_the_seeds_in_this_process_on_a_gpu(two_threads):
    """A forked process cannot use its parent's CUDA context; a GPU's learners keep the thread count."""
    results = per_seed(_where, ("job",), [0, 1, 2], workers=3, device=torch.device("cuda"))
    assert list(results.values()) == [("job", seed, os.getpid(), 2) for seed in [0, 1, 2]]


@pytest.mark.parametrize(("device", "threads"), [("cpu", 1), ("cuda", 2), ("meta", 2)])
def test_one_thread_on_cpu_goes_by_the_device_keyword(two_threads, device, threads):
    @one_thread_on_cpu
    def learner(value: int, *, device: torch.device) -> tuple[int, str, int]:
        """A learner."""
        return value, device.type, torch.get_num_threads()

    assert learner(7, device=torch.device(device)) == (7, device, threads)
    assert torch.get_num_threads() == 2 and learner.__doc__ == "A learner."
