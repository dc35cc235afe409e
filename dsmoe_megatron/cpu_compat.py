"""CPU compatibility layer for Megatron-core (CPU runs and tests only).

Megatron-core assumes CUDA in a handful of places. On a machine without a GPU this module
redirects exactly these, and nothing else:

1. ``device="cuda"``, ``device=<int>``, ``torch.device("cuda")``, ``.cuda()`` and ``.to("cuda")``
   on tensors become CPU (a ``TorchFunctionMode``, so every torch call site is covered).
2. ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` (so ``device=current_device()``
   also works inside autograd backward, where the mode of 1 is not active) and ``set_device``
   does nothing.
3. ``torch.cuda.Stream`` / ``Event`` become inert objects usable as context managers;
   ``stream()``, ``current_stream()``, ``synchronize()`` and the memory statistics are no-ops.
4. The CUDA RNG (``torch.cuda.{get,set}_rng_state``, ``manual_seed``) and Megatron's RNG tracker
   helpers use the CPU generator, so ``model_parallel_cuda_manual_seed`` and
   ``get_cuda_rng_tracker().fork()`` work and stay deterministic.

5. ``tensor.type()`` reports the CUDA type name (``torch.cuda.FloatTensor``): Megatron's
   optimizers check parameter types by these strings.
6. Megatron's activation recompute re-runs forward code inside backward, where the mode of 1 is
   not active (autograd does not carry torch-function modes into backward): its two entry
   points (``CheckpointFunction.backward``, ``CheckpointWithoutOutput._recompute``) run under it.

``activate()`` is a no-op when CUDA is available; ``deactivate()`` restores every original.
The plugin's own modules never rely on this layer: they are device-agnostic.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices in any torch call to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _under_cpu_mode(fn):
    def run(*args, **kwargs):
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    return run


class _InertStream:
    """Stand-in for torch.cuda.Stream and torch.cuda.Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _InertStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0


class _RngStateChangedFilter(logging.Filter):
    # The RNG tracker warns when the CPU RNG moves inside a fork; on CPU the fork *is* the CPU RNG.
    def filter(self, record):
        return "CPU RNG state changed" not in record.getMessage()


def _cpu_rng_get_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_rng_set_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _no_op(*args, **kwargs):
    return None


def _zero(*args, **kwargs):
    return 0


_CUDA_REDIRECTS = {
    "current_device": lambda: _CPU,
    "set_device": _no_op,
    "synchronize": _no_op,
    "empty_cache": _no_op,
    "Stream": _InertStream,
    "Event": type("_InertEvent", (_InertStream,), {}),
    "stream": lambda *a, **k: contextlib.nullcontext(),
    "current_stream": lambda *a, **k: _InertStream(),
    "default_stream": lambda *a, **k: _InertStream(),
    "get_rng_state": _cpu_rng_get_state,
    "set_rng_state": _cpu_rng_set_state,
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the generator directly.
    "manual_seed": lambda seed: torch.default_generator.manual_seed(seed),
    "memory_allocated": _zero,
    "max_memory_allocated": _zero,
    "memory_reserved": _zero,
    "max_memory_reserved": _zero,
    "reset_peak_memory_stats": _no_op,
}


class CpuCompat:
    """The set of redirects; one process-wide instance, see ``activate``/``deactivate``."""

    def __init__(self):
        self._originals: list[tuple[object, str, object]] = []
        self._mode: _CudaToCpuMode | None = None
        self._filter = _RngStateChangedFilter()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self._mode is not None

    def _patch(self, owner, name, value):
        self._originals.append((owner, name, getattr(owner, name)))
        if not isinstance(value, type):
            # torch.compile keys its tracing rules on function identity: one object per name.
            value = functools.wraps(value)(lambda *args, _f=value, **kwargs: _f(*args, **kwargs))
        setattr(owner, name, value)

    def activate(self) -> bool:
        """Install the redirects. Returns True if they are active after the call."""
        with self._lock:
            if self.active:
                return True
            if torch.cuda.is_available():
                return False
            from megatron.core.tensor_parallel import random as mcore_random

            for name, value in _CUDA_REDIRECTS.items():
                self._patch(torch.cuda, name, value)
            self._patch(torch.cuda.random, "get_rng_state", _cpu_rng_get_state)
            self._patch(torch.cuda.random, "set_rng_state", _cpu_rng_set_state)
            self._patch(mcore_random, "_get_cuda_rng_state", _cpu_rng_get_state)
            self._patch(mcore_random, "_set_cuda_rng_state", _cpu_rng_set_state)
            self._patch(torch.Tensor, "record_stream", _no_op)
            for owner, name in ((mcore_random.CheckpointFunction, "backward"),
                                (mcore_random.CheckpointWithoutOutput, "_recompute")):
                self._patch(owner, name, _under_cpu_mode(getattr(owner, name)))
            logging.getLogger(mcore_random.__name__).addFilter(self._filter)
            self._mode = _CudaToCpuMode()
            self._mode.__enter__()
            return True

    def deactivate(self) -> None:
        """Remove every redirect, restoring the original functions."""
        with self._lock:
            if not self.active:
                return
            from megatron.core.tensor_parallel import random as mcore_random

            self._mode.__exit__(None, None, None)
            self._mode = None
            for owner, name, original in reversed(self._originals):
                setattr(owner, name, original)
            self._originals.clear()
            logging.getLogger(mcore_random.__name__).removeFilter(self._filter)


_COMPAT = CpuCompat()


def activate() -> bool:
    """Redirect Megatron-core's CUDA assumptions to CPU; does nothing when CUDA is available."""
    return _COMPAT.activate()


def deactivate() -> None:
    _COMPAT.deactivate()


def is_active() -> bool:
    return _COMPAT.active
