"""Tiny models, fixed batches and a layout-independent training step for the tests.

Every layout starts from the same weights (a dist checkpoint saved by a single-rank run) and
its gradients are written back as a dist checkpoint, so Megatron's own resharding gathers them
into full tensors that compare directly with the single-rank run's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dsmoe_megatron.config import DeepSeekMoEConfig, deepseek_defaults

VOCAB = 128
SEQ = 16


def tiny_config(layout=None, moe: bool = True, **overrides) -> DeepSeekMoEConfig:
    """4 layers, first dense, 8 routed + 1 shared experts, top-3 (fp32)."""
    fields = dict(
        deepseek_defaults(),
        num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        init_method_std=0.05, moe_aux_loss_coeff=0.01,
    )
    if moe:
        fields.update(num_moe_experts=8, moe_router_topk=3, moe_ffn_hidden_size=16,
                      moe_num_shared_experts=1, moe_first_k_dense=1)
    if layout is not None:
        fields.update(layout.config_fields())
    fields.update(overrides)
    fields.setdefault("pipeline_dtype", torch.float32)
    return DeepSeekMoEConfig(**fields)


def reference_block(block, x):
    """Plain PyTorch, one token at a time: shared(x) + sum over chosen experts of g * expert(x)."""
    cfg = block.config
    w_router = block.router.weight
    experts = block.experts
    out = []
    for token in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(token.float() @ w_router.float().t(), dim=-1)
        top_p, top_i = torch.topk(probs, cfg.moe_router_topk)
        if not cfg.moe_router_pre_softmax:
            top_p = top_p / top_p.sum()
        y = torch.zeros_like(token)
        for p, e in zip(top_p, top_i):
            gate_proj, up_proj = experts.gate_up_proj[e].chunk(2, dim=0)
            h = F.silu(gate_proj @ token) * (up_proj @ token)
            y = y + p * (experts.down_proj[e] @ h)
        if block.shared_experts is not None:
            fc1 = block.shared_experts.linear_fc1.weight
            gate, up = fc1.chunk(2, dim=0)
            y = y + block.shared_experts.linear_fc2.weight @ (F.silu(gate @ token) * (up @ token))
        out.append(y)
    return torch.stack(out).view_as(x)


def grads_of(module, x):
    return {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in module.named_parameters()}}


def make_batches(num_microbatches: int, micro_batch_size: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_microbatches):
        tokens = torch.randint(0, VOCAB, (micro_batch_size, SEQ + 1), generator=gen)
        batches.append(dict(
            tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
            position_ids=torch.arange(SEQ).expand(micro_batch_size, SEQ).contiguous(),
            loss_mask=torch.ones(micro_batch_size, SEQ),
        ))
    return batches


def build_chunks(config):
    from dsmoe_megatron.model import build_model_chunks

    return build_model_chunks(config, VOCAB, SEQ)


def forward_backward(chunks, config, batches, forward_only=False):
    """Megatron's schedule (1F1B / interleaved when PP > 1). Returns per-microbatch LM losses."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dsmoe_megatron.train import forward_step

    vpp = len(chunks)
    iterators = [iter(batches) for _ in range(vpp)] if vpp > 1 else iter(batches)
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators,
        model=chunks if vpp > 1 else chunks[0], num_microbatches=len(batches),
        seq_length=SEQ, micro_batch_size=batches[0]["tokens"].shape[0], forward_only=forward_only,
    )
    return [float(d["lm loss"][0] / d["lm loss"][1]) for d in out]


def aux_losses() -> dict[str, list[float]]:
    """Per-layer sums of each balance loss recorded by this rank since the last clear."""
    from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    return {name: entry.values.tolist() for name, entry in tracker.metrics.items()}


def save_grads_as_checkpoint(chunks, directory: Path) -> None:
    """Swap each param's data for its gradient and save: a full-tensor view of the gradients."""
    from megatron.core import dist_checkpointing

    from dsmoe_megatron.checkpoint import model_sharded_state_dict

    saved = []
    for chunk in chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
            saved.append((param, param.data))
            param.data = grad.view_as(param).clone()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))
    finally:
        for param, data in saved:
            param.data = data


def full_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint at its global shape, read with torch.distributed.checkpoint
    in this process (no model, no process group): Megatron's own resharding does the gathering."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from dsmoe_megatron.checkpoint import resolve

    reader = FileSystemReader(str(resolve(directory)))
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def max_differences(dir_a, dir_b) -> dict[str, float]:
    """Per-tensor max |a - b| between two dist checkpoints of the same model."""
    a, b = full_tensors(dir_a), full_tensors(dir_b)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return {k: float((a[k] - b[k]).abs().max()) for k in a}
