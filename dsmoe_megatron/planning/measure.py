"""Measure the activations a transformer layer keeps for its backward pass, on this machine.

Runs the forward of a small decoder block built from the project's own layer specs and records
every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``). Each storage is
counted once, at its size after the forward (a view keeps its whole storage alive; one freed for
recompute in backward counts nothing); parameters, the rotary
frequencies passed in, and storages saved by more than one layer (Megatron's cached causal mask)
are not per-layer activations and are left out. The caller brings up the runtime
(``dsmoe_megatron.runtime.initialize``) with the config's layout.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from dsmoe_megatron.config import DeepSeekMoEConfig
from dsmoe_megatron.profiling import storage_key

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class Measured:
    per_layer: float
    """Mean bytes saved per layer for one micro-batch on this rank."""
    num_layers: int
    by_module: dict[str, int] = field(default_factory=dict)
    """Bytes by the innermost module that saved the storage first (layer index stripped)."""
    shared: int = 0
    """Bytes of storages saved by several layers (not per-layer activations)."""


def measure_block(cfg: DeepSeekMoEConfig, seq_length: int, micro_batch_size: int,
                  seed: int = 0) -> Measured:
    """Saved-activation bytes per layer of a ``cfg.num_layers``-layer block on this rank.

    The block is the decoder of one pipeline stage without the final norm; its input is the
    [seq / SP, batch, hidden] hidden state a previous stage or the embedding would pass on.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock

    from dsmoe_megatron.specs import get_dsmoe_block_spec

    torch.manual_seed(seed)
    block = TransformerBlock(cfg, get_dsmoe_block_spec(cfg), post_process=False)
    block = block.to(cfg.params_dtype)
    block.train()
    sp = cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1
    x = torch.randn(seq_length // sp, micro_batch_size, cfg.hidden_size, dtype=cfg.params_dtype,
                    requires_grad=True)
    rope = RotaryEmbedding(cfg.kv_channels, rotary_percent=1.0)(seq_length)
    excluded = {storage_key(p) for p in block.parameters()}
    excluded.add(storage_key(rope))

    saved: dict[int, tuple[int, str, set]] = {}
    modules: list[str] = []
    hooks = []
    for name, module in block.named_modules():
        hooks.append(module.register_forward_pre_hook(
            lambda _m, _a, name=name: modules.append(name)))
        hooks.append(module.register_forward_hook(lambda *_: modules.pop() and None))

    def pack(t: torch.Tensor):
        storage, key = t.untyped_storage(), storage_key(t)
        if key not in excluded and storage.nbytes():
            where = modules[-1] if modules else ""
            match = _LAYER.search(where)
            entry = saved.setdefault(key, (storage, where, set()))
            entry[2].add(int(match.group(1)) if match else where)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(x, attention_mask=None, rotary_pos_emb=rope)
    finally:
        for hook in hooks:
            hook.remove()
    # Sizes after the forward: a storage freed for recompute in backward (Megatron's
    # CheckpointWithoutOutput resizes it to 0) is not kept.
    sizes = [(storage.nbytes(), where, layers) for storage, where, layers in saved.values()]
    del out, saved
    by_module: dict[str, int] = defaultdict(int)
    shared = total = 0
    for nbytes, where, layers in sizes:
        if len({i for i in layers if isinstance(i, int)}) > 1:
            shared += nbytes
            continue
        total += nbytes
        by_module[_LAYER.sub(".", where).strip(".") or "block"] += nbytes
    return Measured(per_layer=total / cfg.num_layers, num_layers=cfg.num_layers,
                    by_module=dict(by_module), shared=shared)
