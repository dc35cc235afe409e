"""A stand-in for Transformer Engine's FusedAdam on CPU, and Megatron-core built with it.

``FusedAdam`` keeps its state as TE's does in Python (transformer_engine/pytorch/optimizers/
fused_adam.py, v2.9 to v2.12; apex's FusedAdam keeps the same step and moments): the step an
int in each parameter group, advanced only in groups holding parameters; per parameter only
exp_avg and exp_avg_sq; a load_state_dict that sets each loaded per-parameter state by name (a
``step`` there is a KeyError); a step whose kernel takes an int step. Its update (AdamW, the
kernel's arithmetic) is plain torch.

``as_with_transformer_engine()`` makes Megatron-core pick it, and read and write the
optimizer's step, as it does when TE imports.
"""

from __future__ import annotations

import contextlib
from itertools import chain

import torch


class FusedAdam(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, bias_correction=True, adam_w_mode=True, capturable=False):
        assert not amsgrad and not capturable
        super().__init__(params, {"lr": lr, "bias_correction": bias_correction, "betas": betas,
                                  "eps": eps, "weight_decay": weight_decay})
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.name_to_dtype_map = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32,
                                  "master_param": torch.float32}

    def set_scaled_state(self, param, state_name, unscaled_state):
        assert unscaled_state.dtype == torch.float32
        dtype = self.name_to_dtype_map[state_name]  # TE: KeyError for any other name
        state = self.state[param]
        if state_name not in state:
            state[state_name] = torch.empty_like(param, dtype=dtype)
        state[state_name].copy_(unscaled_state)

    def initialize_state(self, param, store_param_remainders=False):
        for name in ("exp_avg", "exp_avg_sq"):
            self.state[param][name] = torch.zeros_like(param, dtype=torch.float32)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for k, v in state_dict["state"].items():
            if k in id_map:
                param = id_map[k]
                self.state[param] = {}
                for name in v:
                    if v[name] is not None:
                        self.set_scaled_state(param, name, v[name].float())

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if len(group["params"]) == 0:
                continue
            if "step" in group:
                group["step"] += 1
            else:
                group["step"] = 1
            step = group["step"]
            if not isinstance(step, int):  # pybind11 turns a float away from `int step`
                raise TypeError("multi_tensor_adam(): incompatible function arguments; "
                                f"step: int expected, got {type(step).__name__}")
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            correction1 = 1 - beta1**step if group["bias_correction"] else 1.0
            correction2 = 1 - beta2**step if group["bias_correction"] else 1.0
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    self.initialize_state(p)
                if p.grad is None:
                    continue
                grad = p.grad.float()
                if not self.adam_w_mode:
                    grad = grad + decay * p
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (state["exp_avg"] / correction1) / (
                    (state["exp_avg_sq"] / correction2).sqrt() + eps)
                if self.adam_w_mode:
                    update = update + decay * p
                p.sub_(lr * update)
        return loss


@contextlib.contextmanager
def as_with_transformer_engine():
    """Megatron-core's optimizer modules as they import with TE installed."""
    from unittest import mock

    from megatron.core import optimizer
    from megatron.core.optimizer import distrib_optimizer

    with mock.patch.multiple(optimizer, Adam=FusedAdam, USING_PYTORCH_OPTIMIZER=False), \
            mock.patch.multiple(distrib_optimizer, Adam=FusedAdam, HAVE_APEX_OR_TE=True,
                                USING_TE_OPTIMIZER=True):
        yield
