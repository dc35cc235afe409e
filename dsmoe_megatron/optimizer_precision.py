"""Resuming the standard optimizer's state in another precision (bf16/fp16 <-> fp32).

Megatron's standard (non-distributed) optimizer saves a different structure in each precision:
in bf16/fp16, Adam's state under ``optimizer`` and the fp32 master weights as
``optimizer.state.fp32_param.<key>``; in fp32, Adam's state alone, the model's weights being the
master weights. Its checkpoints therefore load only into the precision they were written in.
(The distributed optimizer saves one structure, fp32 ``param`` included, in every precision.)

A ``PrecisionBridge`` per sub-optimizer asks the load for the saved structure and puts the
master weights where this run keeps them, at full precision: from a bf16/fp16 checkpoint into
the fp32 model (not its rounded bf16 weights), from an fp32 checkpoint into the fp32 master
copies of a bf16/fp16 run (read from the checkpoint's fp32 model weights).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
)
from megatron.core.optimizer.optimizer import FP32Optimizer, Float16OptimizerWithFloat16Params

MASTER_PREFIX = "optimizer.state.fp32_param"
_MASTERS = "fp32_from_fp16_params"  # the key of the master weights in a mixed-precision state


def _standard(sub) -> bool:
    return isinstance(sub, (Float16OptimizerWithFloat16Params, FP32Optimizer))


@dataclass
class PrecisionBridge:
    sub: object  # a standard sub-optimizer whose precision differs from the checkpoint's
    into_fp32: bool  # a bf16/fp16 checkpoint into an fp32 run (else fp32 into bf16/fp16)
    # into_fp32: fp32 buffers the checkpoint's master weights load into, per parameter group;
    # else: (master tensor, sharded tensor of the checkpoint's model weights) pairs.
    masters: list = field(default_factory=list)

    def request(self, model_state: dict, current: dict) -> dict:
        """The saved structure, for the sub-optimizer's own sharded state dict ``current``."""
        if self.into_fp32:
            # Parameters are numbered in group order, as in the optimizer's state dict.
            by_id = get_param_id_to_sharded_param_map(model_state, self.sub.get_parameters())
            self.masters = [[torch.empty_like(p) for p in group["params"]]
                            for group in self.sub.optimizer.param_groups]
            ids = iter(range(len(by_id)))
            return {"optimizer": current, _MASTERS: [
                [make_sharded_optimizer_tensor(by_id[next(ids)], buffer, MASTER_PREFIX)
                 for buffer in buffers] for buffers in self.masters]}
        # The masters are read apart (read_masters): the checkpoint has them as model weights.
        self.masters = [(t.data, replace(t, key=t.key.removeprefix(MASTER_PREFIX + ".")))
                        for t in nested_values(current[_MASTERS])]
        return current["optimizer"]

    def read_masters(self, load) -> None:
        """Fill a bf16/fp16 run's master copies from the fp32 checkpoint's model weights;
        ``load`` is dist_checkpointing.load bound to the checkpoint."""
        if self.into_fp32:
            return
        loaded = load({str(i): sharded for i, (_, sharded) in enumerate(self.masters)})
        for i, (master, _) in enumerate(self.masters):
            master.copy_(loaded[str(i)])

    def to_current_structure(self, loaded: dict) -> None:
        """Turn the loaded sub-state (in place) into the structure this optimizer loads; into
        fp32, the master weights replace the model's (loaded from rounded bf16/fp16 values)."""
        if self.into_fp32:
            inner, masters = loaded["optimizer"], loaded[_MASTERS]
            for group, values in zip(self.sub.optimizer.param_groups, masters):
                for param, value in zip(group["params"], values):
                    param.data.copy_(value)
            loaded.clear()
            loaded.update(inner)
        else:
            inner = dict(loaded)
            loaded.clear()
            loaded.update(optimizer=inner, **{_MASTERS: self.sub.fp32_from_float16_groups})


def bridges(saved_sub_states: list, subs: list) -> list[PrecisionBridge | None]:
    """One bridge per standard sub-optimizer whose precision differs from its saved state's."""
    out = []
    for saved, sub in zip(saved_sub_states, subs):
        # A bf16/fp16 state nests Adam's under "optimizer" (its masters are tensors, not in
        # the common state); an fp32 state is Adam's own.
        saved_masters = isinstance(saved, dict) and "optimizer" in saved
        keeps_masters = isinstance(sub, Float16OptimizerWithFloat16Params)
        differs = _standard(sub) and saved_masters != keeps_masters
        out.append(PrecisionBridge(sub, into_fp32=saved_masters) if differs else None)
    return out


@contextlib.contextmanager
def saved_structure(precision_bridges: list):
    """While the load's request is built: each bridged sub-optimizer asks for the saved
    structure (the chained optimizer around it still adds its key prefix)."""
    patched = []
    for bridge in filter(None, precision_bridges):
        sub, own = bridge.sub, bridge.sub.sharded_state_dict

        def sharded_state_dict(model_state, *args, _own=own, _bridge=bridge, **kwargs):
            return _bridge.request(model_state, _own(model_state, *args, **kwargs))

        sub.sharded_state_dict = sharded_state_dict
        patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub.sharded_state_dict
