"""Independent jobs on one thread each, inline or in forked workers (pipeline/infra/workers.py): the same
results either way, on one thread, the caller's thread count back afterwards, failures raised."""

import os

import pytest
import torch

from pipeline.infra.workers import single_threaded


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
