"""Per-GPU memory of a run: weights, gradients, optimizer state, activations, and an allowance.

Weights in the parameter dtype; FP8 (TE) adds a cached FP8 copy of every GEMM weight and its
transpose (2 bytes). Gradients in Megatron DDP's fp32 buffer (dsmoe-train sets
``grad_reduce_in_fp32``). Adam: fp32 main parameters (bf16/fp16 models) and two fp32 moments,
sharded over data parallelism (routed experts: over expert data parallelism) by the distributed
optimizer (dsmoe-train's ``use_distributed_optimizer``, on by default); without it every rank
holds all of it.

Activations: ``activations.py`` per layer and micro-batch, with full recompute applied per model
chunk as Megatron's TransformerBlock does (``uniform``: every unit of ``recompute_num_layers``
layers keeps only its input; ``block``: the first ``recompute_num_layers`` layers of each chunk
do). Micro-batches in flight at the peak follow Megatron's schedules: 1F1B holds
min(PP - rank, micro-batches); the interleaved schedule holds its warm-up forwards plus one, in
its schedule-table order over the virtual chunks. While one layer (one recompute unit) runs
its backward its full activations exist once more ("transient").

The allowance covers what is not a tensor of the model: the CUDA context, cuBLAS/cuDNN
workspaces and NCCL's buffers for the TP/PP/DP/EP communicators (a fixed amount), and the
caching allocator's fragmentation (a fraction of the tensors); MoE's varying token counts per
expert make fragmentation larger than for dense models.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from types import SimpleNamespace

from dsmoe_megatron.config import DeepSeekMoEConfig
from dsmoe_megatron.planning.activations import Micro, head_activations, layer_activations
from dsmoe_megatron.planning.hardware import GB
from dsmoe_megatron.planning.params import ParamCount, bytes_per_weight


@dataclass(frozen=True)
class Allowance:
    fixed: float = 3 * GB
    """CUDA context (~0.5-1 GB), cuBLAS/cuDNN workspaces, NCCL communicator buffers."""
    fragmentation: float = 0.10
    """Of the tensors' peak: the caching allocator's unusable gaps."""

    def of(self, tensors: float) -> float:
        return self.fixed + self.fragmentation * tensors

    def describe(self) -> str:
        return (f"allowance: {self.fixed / GB:g} GB (CUDA context, cuBLAS/cuDNN workspaces, NCCL "
                f"buffers) + {self.fragmentation:.0%} of the tensors (allocator fragmentation)")


@dataclass(frozen=True)
class MemoryOptions:
    impl: str = "te"
    """te (GPU: Transformer Engine) or local (Megatron-core's local modules, the CPU path)."""
    distributed_optimizer: bool | None = None
    """None: on whenever the world has more than one GPU; dsmoe-plan passes the run's
    ``use_distributed_optimizer``."""
    allowance: Allowance = field(default_factory=Allowance)


@dataclass
class StageMemory:
    stage: int
    layers: int
    params: int               # parameters held by one GPU of this stage
    dense_params: int         # of which replicated over data parallelism
    expert_params: int        # of which replicated over expert data parallelism
    weights: float            # bytes
    fp8_weights: float
    grads: float
    optimizer: float
    activations: float        # kept for the backward, all micro-batches in flight
    transient: float          # one layer's (recompute unit's) activations during its backward
    in_flight: list[int]      # micro-batches held per model chunk at the peak
    allowance: float = 0.0

    @property
    def tensors(self) -> float:
        return (self.weights + self.fp8_weights + self.grads + self.optimizer
                + self.activations + self.transient)

    @property
    def total(self) -> float:
        return self.tensors + self.allowance

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return dict(out, tensors=self.tensors, total=self.total)


# ---------------------------------------------------------------------------------------------
# Layout of layers and micro-batches


_SPLIT_FIELDS = ("num_layers", "pipeline_model_parallel_size",
                 "virtual_pipeline_model_parallel_size", "num_layers_in_first_pipeline_stage",
                 "num_layers_in_last_pipeline_stage", "account_for_embedding_in_pipeline_split",
                 "account_for_loss_in_pipeline_split")
_SPLITS: dict[tuple, list] = {}


def stage_chunks(cfg: DeepSeekMoEConfig) -> list[list[list[int]]]:
    """Layer indices of every model chunk (virtual stage) of every pipeline rank, as Megatron
    splits them. Shared between calls with the same split: do not modify."""
    if cfg.pipeline_model_parallel_layout is not None:
        return _split(cfg)
    key = tuple(getattr(cfg, name) for name in _SPLIT_FIELDS)
    if key not in _SPLITS:
        _SPLITS[key] = _split(cfg)
    return _SPLITS[key]


def _split(cfg: DeepSeekMoEConfig) -> list[list[list[int]]]:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    vpp = cfg.virtual_pipeline_model_parallel_size
    stages = []
    for rank in range(cfg.pipeline_model_parallel_size):
        chunks = []
        for vp_stage in range(vpp) if vpp else [None]:
            offset = get_transformer_layer_offset(cfg, vp_stage=vp_stage, pp_rank=rank)
            count = get_num_layers_to_build(cfg, vp_stage=vp_stage, pp_rank=rank)
            chunks.append(list(range(offset, offset + count)))
        stages.append(chunks)
    return stages


def in_flight(cfg: DeepSeekMoEConfig, rank: int, microbatches: int) -> list[int]:
    """Micro-batches each model chunk of pipeline ``rank`` holds at the peak of a step."""
    p = cfg.pipeline_model_parallel_size
    return list(_in_flight(p, cfg.virtual_pipeline_model_parallel_size,
                           cfg.microbatch_group_size_per_vp_stage or p, rank, microbatches))


@lru_cache(maxsize=4096)
def _in_flight(p: int, vpp: int | None, group: int, rank: int, microbatches: int) -> tuple:
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    chunks = vpp or 1
    if p == 1:
        return (1,) * chunks
    pp_group = SimpleNamespace(size=lambda: p, rank=lambda: rank)
    _, _, warmup, _ = get_pp_rank_microbatches(
        microbatches, chunks, group,
        p2p_communicator=SimpleNamespace(pp_group=pp_group,
                                         virtual_pipeline_model_parallel_size=vpp))
    live = min(warmup + 1, microbatches * chunks)
    counts = [0] * chunks
    for _, chunk in _schedule_table(microbatches, chunks, group)[:live]:
        counts[chunk] += 1
    return tuple(counts)


@lru_cache(maxsize=64)
def _schedule_table(microbatches: int, chunks: int, group: int) -> list:
    from megatron.core.pipeline_parallel.schedules import get_schedule_table

    return get_schedule_table(microbatches, chunks, group)


# ---------------------------------------------------------------------------------------------
# Activations of a chunk


def recompute_modules(cfg: DeepSeekMoEConfig) -> frozenset:
    """Selective recompute in effect (Megatron fills recompute_modules even when it is off)."""
    if cfg.recompute_granularity != "selective":
        return frozenset()
    return frozenset(cfg.recompute_modules or ())


def chunk_activations(cfg: DeepSeekMoEConfig, moe_layers: list[bool], m: Micro
                      ) -> tuple[float, float]:
    """(kept, transient) bytes of one micro-batch through a model chunk whose layers are MoE
    where ``moe_layers`` says so; ``m`` without recompute (``cfg``'s recompute is applied)."""
    if not moe_layers:
        return 0.0, 0.0

    def per_layer(m: Micro) -> list[float]:
        kinds = {moe: sum(layer_activations(m, moe).values()) for moe in set(moe_layers)}
        return [kinds[moe] for moe in moe_layers]

    full = per_layer(m)
    if cfg.recompute_granularity != "full":
        return sum(per_layer(replace(m, recompute=recompute_modules(cfg)))), max(full)
    unit_input = m.act * m.hidden * m.tokens / m.sp
    if cfg.distribute_saved_activations:
        unit_input /= cfg.tensor_model_parallel_size
    n = cfg.recompute_num_layers
    if cfg.recompute_method == "uniform":
        units = [full[i:i + n] for i in range(0, len(full), n)]
        return len(units) * unit_input, max(sum(unit) for unit in units)
    recomputed = min(n, len(full))
    return recomputed * unit_input + sum(full[recomputed:]), max(full)


# ---------------------------------------------------------------------------------------------
# The estimate


def _fp8_copies(cfg: DeepSeekMoEConfig, impl: str) -> int:
    return 2 if cfg.fp8 and impl == "te" else 0


def estimate_memory(cfg: DeepSeekMoEConfig, params: ParamCount, world_size: int,
                    microbatches: int, seq: int, batch: int,
                    options: MemoryOptions = MemoryOptions()) -> dict:
    t, p = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    ep = cfg.expert_model_parallel_size
    etp = cfg.expert_tensor_parallel_size or t
    dp = world_size // (t * p)
    edp = world_size // (etp * ep * p)
    weight_bytes = bytes_per_weight(cfg)
    distributed = (world_size > 1 if options.distributed_optimizer is None
                   else options.distributed_optimizer)
    # Adam: fp32 main params (not for fp32 models) + two fp32 moments
    opt_bytes = (4 if weight_bytes == 2 else 0) + 8
    fp8 = _fp8_copies(cfg, options.impl)
    pattern = cfg.moe_layer_pattern()
    m = Micro.of(cfg, seq, batch, options.impl)
    stages = []
    # what one GPU holds of one layer: (replicated over DP, over expert DP, GEMM weights)
    kinds = {}
    for moe in set(pattern):
        layer = params.layers[pattern.index(moe)]
        sharded = (layer.attention + layer.ffn) // t
        kinds[moe] = (sharded + layer.norms + layer.router, layer.routed // (ep * etp),
                      sharded + layer.routed // (ep * etp))
    for s, chunks in enumerate(stage_chunks(cfg)):
        moe_layers = sum(pattern[i] for chunk in chunks for i in chunk)
        counts_by_kind = ((True, moe_layers), (False, sum(map(len, chunks)) - moe_layers))
        dense, expert, gemm = (sum(n * kinds[moe][j] for moe, n in counts_by_kind if n)
                               for j in range(3))
        if s == 0:
            dense += params.embedding // t
        if s == p - 1:
            dense += params.output_layer // t + params.final_norm
        in_flight_counts = in_flight(cfg, s, microbatches)
        kept = transient = 0.0
        for c, (chunk, count) in enumerate(zip(chunks, in_flight_counts)):
            chunk_kept, chunk_transient = chunk_activations(cfg, [pattern[i] for i in chunk], m)
            if s == p - 1 and c == len(chunks) - 1:
                chunk_kept += head_activations(m, params.padded_vocab_size)
            kept += count * chunk_kept
            transient = max(transient, chunk_transient)
        total_params = dense + expert
        shards = (dp, edp) if distributed else (1, 1)
        stage = StageMemory(
            stage=s, layers=sum(len(c) for c in chunks), params=total_params, dense_params=dense,
            expert_params=expert, weights=total_params * weight_bytes, fp8_weights=gemm * fp8,
            grads=total_params * 4,
            optimizer=dense * opt_bytes / shards[0] + expert * opt_bytes / shards[1],
            activations=kept, transient=transient, in_flight=in_flight_counts)
        stage.allowance = options.allowance.of(stage.tensors)
        stages.append(stage)
    worst = max(stages, key=lambda st: st.total)
    return {
        "world_size": world_size,
        "data_parallel_size": dp,
        "expert_data_parallel_size": edp,
        "num_microbatches": microbatches,
        "distributed_optimizer": distributed,
        "stages": stages,
        "max_bytes_per_gpu": worst.total,
        "max_tensor_bytes_per_gpu": worst.tensors,
        "max_stage": worst.stage,
    }


def memory_assumptions(cfg: DeepSeekMoEConfig, distributed: bool,
                       options: MemoryOptions = MemoryOptions()) -> list[str]:
    """What estimate_memory assumed, in words."""
    weight_bytes = bytes_per_weight(cfg)
    granularity = cfg.recompute_granularity
    if granularity == "full":
        recompute = (f"full recompute, {cfg.recompute_method} over {cfg.recompute_num_layers} "
                     "layer(s)")
    elif granularity == "selective":
        recompute = f"selective recompute of {', '.join(sorted(recompute_modules(cfg)))}"
    else:
        recompute = "no recompute"
    impl = ("Transformer Engine modules, fused attention" if options.impl == "te"
            else "Megatron-core local modules, unfused attention")
    return [
        f"weights in {'bf16/fp16' if weight_bytes == 2 else 'fp32'} ({weight_bytes} bytes), "
        "gradients in an fp32 buffer (4 bytes)"
        + (", FP8 copies of the GEMM weights and their transposes (2 bytes)"
           if _fp8_copies(cfg, options.impl) else ""),
        ("Megatron distributed optimizer: " if distributed else "Adam, not sharded: ")
        + ("fp32 main params + " if weight_bytes == 2 else "")
        + "Adam moments (fp32)"
        + (", sharded over data parallelism (dense parameters) and expert data parallelism "
           "(routed experts)" if distributed else ""),
        f"activations: {impl}; {recompute}; balanced routing; Megatron's 1F1B / interleaved "
        "schedule (micro-batches in flight per chunk listed); one layer's (recompute unit's) "
        "activations again during its backward",
        options.allowance.describe(),
    ]
