"""Rank functions for the multi-process tests (module level so spawned processes can import them)."""

from __future__ import annotations

from pathlib import Path

import torch

from dsmoe_megatron.train import wrap_ddp
from common import (
    aux_losses,
    build_chunks,
    forward_backward,
    make_batches,
    save_grads_as_checkpoint,
    tiny_config,
)


def save_initial_weights(directory: str, config_overrides: dict) -> None:
    """Single rank: build the tiny model from its seed and save it as the common start."""
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.runtime import ParallelLayout

    layout = ParallelLayout()
    chunks = build_chunks(tiny_config(layout, **config_overrides))
    checkpoint.save(directory, 0, chunks)


def single_rank_reference(root, config_overrides: dict, num_microbatches: int) -> dict:
    """Save the common initial weights, then run the single-rank step from them (in `root`)."""
    from distributed import run_on_ranks

    from dsmoe_megatron.runtime import ParallelLayout

    run_on_ranks(save_initial_weights, 1, args=(str(root / "init"), config_overrides))
    [single] = run_on_ranks(train_step, 1, args=(ParallelLayout(), config_overrides,
                                                 str(root / "init"), str(root / "grads"),
                                                 num_microbatches))
    return single


def resave(layout, config_overrides: dict, src: str, dst: str) -> None:
    """Load a checkpoint under `layout` and save it again from there."""
    from dsmoe_megatron import checkpoint

    chunks = build_chunks(tiny_config(layout, **config_overrides))
    checkpoint.load(src, chunks)
    checkpoint.save(dst, 0, chunks)


def train_step(layout, config_overrides: dict, init_dir: str, out_dir: str,
               num_microbatches: int, optimizer: str | None = None) -> dict:
    """One forward/backward of the tiny model on `layout`.

    With `optimizer` ("adam" or "distributed-adam") it also takes one step and saves the new
    weights to `out_dir`; otherwise it saves the gradients there.

    Data-parallel rank r takes micro-batches r, r + DP, ... of the same fixed list, so the union
    over ranks is exactly the single-rank run's batch.
    """
    from megatron.core import parallel_state as ps

    from dsmoe_megatron import checkpoint

    config = tiny_config(layout, **config_overrides)
    chunks = build_chunks(config)
    checkpoint.load(init_dir, chunks)
    distributed = optimizer == "distributed-adam"
    model = wrap_ddp(chunks, config, use_distributed_optimizer=distributed)
    adam = _adam(model, config) if optimizer else None
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = make_batches(num_microbatches)[dp_rank::dp]
    for chunk in model:
        chunk.zero_grad_buffer()
    losses = forward_backward(model, config, batches)
    result = dict(
        losses=losses, aux=aux_losses(), dp_rank=dp_rank,
        pp_rank=ps.get_pipeline_model_parallel_rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
    )
    if adam is not None:
        adam.step()
        checkpoint.save(out_dir, 1, model)
    else:
        save_grads_as_checkpoint([c.module for c in model], Path(out_dir))
    return result


def _adam(model, config):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer="adam", lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        clip_grad=1.0, use_distributed_optimizer=model[0].ddp_config.use_distributed_optimizer,
        bf16=False, fp16=False, params_dtype=torch.float32,
    )
    return get_megatron_optimizer(opt_config, model)


def resave_run_checkpoint(src: str, dst: str, layout) -> dict:
    """Load a trainer-style checkpoint (with run.yaml) under `layout` and save it from there."""
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.model import build_model, padded_vocab_size
    from dsmoe_megatron.yaml_config import run_config_from_dict

    import yaml

    text = checkpoint.read_run_config_yaml(src)
    overrides = [
        f"model_parallel.tensor_model_parallel_size={layout.tensor}",
        f"model_parallel.pipeline_model_parallel_size={layout.pipeline}",
        f"model_parallel.expert_model_parallel_size={layout.expert}",
    ]
    run = run_config_from_dict(yaml.safe_load(text), overrides)
    model = build_model(run.model, padded_vocab_size(run.train.vocab_size, layout.tensor),
                        run.train.seq_length)
    checkpoint.load(src, [model])
    checkpoint.save(dst, 4, [model], run_config_yaml=text)
    local_experts = model.decoder.layers[-1].mlp.experts.num_local_experts
    return {"layers": len(model.decoder.layers), "experts": local_experts}


def count_host_syncs(layout) -> dict:
    """Host syncs of one forward and one backward of a DeepSeekMoE block on this rank, for each
    CPU expert backend: {backend: (forward events, backward events)}."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from dsmoe_megatron.moe import DeepSeekMoE
    from dsmoe_megatron.profiling import HostSyncCounter

    counts = {}
    for backend in ("grouped_mm", "sequential"):
        config = tiny_config(layout, moe_expert_backend=backend)
        sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        block = DeepSeekMoE(config, sub).train()
        x = torch.randn(8, 2, config.hidden_size, requires_grad=True)
        with HostSyncCounter() as forward:
            out, _ = block(x)
        with HostSyncCounter() as backward:
            out.sum().backward()
        counts[backend] = (forward.events, backward.events)
    return counts


def padded_vocabulary_loss(layout) -> dict:
    """The loss of a model whose padded vocabulary (256 rows) is masked to 100 real ones, and
    an independent one: torch's cross-entropy over the first 100 columns of its gathered logits;
    the gradient of the output layer's padding rows."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from common import SEQ, tiny_config
    from dsmoe_megatron.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(layout), 256, SEQ, real_vocab_size=100)
    tokens = torch.randint(0, 100, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(SEQ).expand(2, SEQ)
    loss = model(inputs, positions, None, labels=labels)
    loss.sum().backward()
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(inputs, positions, None))
    reference = torch.nn.functional.cross_entropy(
        logits[..., :100].flatten(0, 1), labels.flatten(), reduction="none").view(2, SEQ)
    grad = model.output_layer.weight.grad
    rows = torch.arange(grad.shape[0]) + ps.get_tensor_model_parallel_rank() * grad.shape[0]
    return {"loss": loss.detach(), "reference": reference,
            "padding_grad": float(grad[rows >= 100].abs().sum()),
            "real_grad": float(grad[rows < 100].abs().sum())}
