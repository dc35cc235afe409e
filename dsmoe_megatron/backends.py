"""Optional accelerated libraries, imported lazily: Transformer Engine and apex are used when they
import (they need a GPU), with a clean fallback to Megatron-core's local modules and torch ops."""

from __future__ import annotations

import functools

import torch


@functools.cache
def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


@functools.cache
def apex_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import apex  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def resolve_expert_backend(requested: str) -> str:
    """`auto` picks te > grouped_mm > sequential by what this machine supports."""
    if requested != "auto":
        return requested
    if te_available():
        return "te"
    if grouped_mm_available():
        return "grouped_mm"
    return "sequential"
