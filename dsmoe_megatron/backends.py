"""Optional accelerated libraries, imported lazily: Transformer Engine and apex are used when they
import (they need a GPU), with a fallback to Megatron-core's local modules and torch ops.

Not installed is a quiet, documented choice. Installed but failing to import (a TE built against
another torch or CUDA, say) is reported once per process with the import error, because the run then
silently differs: local attention/norm modules with another checkpoint layout, no FP8, another expert
backend. ``DSMOE_DISABLE_TE=1`` takes the local path on purpose (and silences the report).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys

import torch
from torch.torch_version import TorchVersion

DISABLE_TE_ENV = "DSMOE_DISABLE_TE"


def importable(package: str, module: str, consequence: str) -> bool:
    """Whether ``module`` imports; False without a word when ``package`` is not installed."""
    if importlib.util.find_spec(package) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any failure means "not usable here"
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"dsmoe_megatron: WARNING: {package} is installed but `import {module}` fails "
                  f"({type(err).__name__}: {err}). {consequence}", file=sys.stderr, flush=True)
        return False
    return True


@functools.cache
def te_available() -> bool:
    if os.environ.get(DISABLE_TE_ENV, "") not in ("", "0"):
        return False
    if not torch.cuda.is_available():
        return False
    return importable(
        "transformer_engine", "transformer_engine.pytorch",
        "Falling back to Megatron-core's local modules: no FP8, no TE expert backend, and "
        "checkpoints with the local layer layout instead of TE's. Fix the install (README, "
        f"'Transformer Engine') or set {DISABLE_TE_ENV}=1 to use the local path on purpose.")


@functools.cache
def apex_available() -> bool:
    if not torch.cuda.is_available():
        return False
    return importable("apex", "apex", "Falling back to torch's fused-op replacements.")


@functools.cache
def grouped_mm_runs(dtype: torch.dtype | None = None) -> bool:
    """Whether ``torch._grouped_mm`` runs on this machine's device (in ``dtype``, if given).

    torch 2.8 has it for CUDA only (no CPU kernel; 2.9 added one), so a tiny call tells on the
    CPU. On CUDA, torch 2.8 has only its grouped kernel: bf16 on sm90 ("only supported on CUDA
    devices with compute capability = 9.0"); 2.9 added a loop of GEMMs for the rest.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.cuda.is_available():
        return TorchVersion(torch.__version__) >= "2.9" or (
            dtype in (None, torch.bfloat16) and torch.cuda.get_device_capability()[0] == 9)
    try:
        torch._grouped_mm(torch.zeros(2, 8), torch.zeros(1, 8, 8),
                          offs=torch.tensor([2], dtype=torch.int32))
    except (NotImplementedError, RuntimeError):
        return False
    return True


def grouped_mm_available(dtype: torch.dtype | None = None) -> bool:
    """Whether ``torch._grouped_mm`` runs a grouped kernel here (for ``dtype``, if given).

    On CUDA torch has one for bf16 on sm90 and sm100 only (its gate is compute capability major
    9 or 10: not sm120, the RTX / workstation Blackwell); elsewhere it falls back to a GEMM per
    expert after copying the offsets to the host, a host sync per GEMM (the per-expert loop
    syncs once per layer). On the CPU any dtype runs, from torch 2.9.
    """
    if not grouped_mm_runs(dtype):
        return False
    if not torch.cuda.is_available():
        return True
    return dtype in (None, torch.bfloat16) and torch.cuda.get_device_capability()[0] in (9, 10)


def resolve_expert_backend(requested: str, dtype: torch.dtype | None = None) -> str:
    """`auto` picks te > grouped_mm > sequential by what this machine runs best in ``dtype``."""
    if requested != "auto":
        return requested
    if te_available():
        return "te"
    if grouped_mm_available(dtype):
        return "grouped_mm"
    return "sequential"
