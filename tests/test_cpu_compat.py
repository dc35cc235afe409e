"""The CPU compatibility layer: what it redirects, that it is reversible, and off on GPUs."""

import pytest
import torch

from dsmoe_megatron import cpu_compat


@pytest.fixture
def fresh_compat():
    """A private instance; the process-wide one (active if another test brought up the runtime)
    is switched off meanwhile and back on afterwards."""
    was_active = cpu_compat.is_active()
    cpu_compat.deactivate()
    compat = cpu_compat.CpuCompat()
    yield compat
    compat.deactivate()
    if was_active:
        cpu_compat.activate()


def test_redirects_cuda_devices_streams_and_rng_to_cpu(fresh_compat):
    if torch.cuda.is_available():
        pytest.skip("the layer is inactive on a GPU machine (see the next test)")
    fresh_compat.activate()
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), stream:
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.manual_seed(7)
    state = torch.cuda.get_rng_state()
    first = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


def test_megatron_rng_tracker_forks_deterministically(fresh_compat):
    if torch.cuda.is_available():
        pytest.skip("CUDA RNG on a GPU machine")
    from megatron.core.tensor_parallel import random as mcore_random

    fresh_compat.activate()
    mcore_random.get_cuda_rng_tracker().reset()
    mcore_random.get_cuda_rng_tracker().add("test-rng", 1234)
    torch.manual_seed(0)
    with mcore_random.get_cuda_rng_tracker().fork("test-rng"):
        inside = torch.rand(4)
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(4), after)  # the default stream is unaffected by the fork
    mcore_random.get_cuda_rng_tracker().reset()
    mcore_random.get_cuda_rng_tracker().add("test-rng", 1234)
    with mcore_random.get_cuda_rng_tracker().fork("test-rng"):
        assert torch.equal(torch.rand(4), inside)  # same seed, same numbers
    mcore_random.get_cuda_rng_tracker().reset()


def test_deactivate_restores_every_original(fresh_compat):
    if torch.cuda.is_available():
        pytest.skip("inactive on a GPU machine")
    from megatron.core.tensor_parallel import random as mcore_random

    originals = (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.synchronize,
                 torch.cuda.get_rng_state, mcore_random._get_cuda_rng_state,
                 torch.Tensor.record_stream)
    fresh_compat.activate()
    assert torch.cuda.current_device is not originals[0]
    fresh_compat.deactivate()
    assert not fresh_compat.active
    assert (torch.cuda.current_device, torch.cuda.Stream, torch.cuda.synchronize,
            torch.cuda.get_rng_state, mcore_random._get_cuda_rng_state,
            torch.Tensor.record_stream) == originals
    assert torch.ones(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.empty(1, device="cuda")


def test_not_activated_when_cuda_is_available(fresh_compat, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.cuda.current_device
    assert fresh_compat.activate() is False
    assert not fresh_compat.active
    assert torch.cuda.current_device is before
