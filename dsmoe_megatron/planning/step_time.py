"""Estimated time of one optimizer step, with its breakdown.

Per micro-batch and pipeline rank: the GEMMs at a stated fraction of the GPU's peak (FP8 peak
under ``fp8``) or, where that is slower, at the HBM bandwidth their weights take, flash
attention at another (the causal mask halves the work the FLOPs convention counts),
element-wise and memory-bound work as HBM traffic, and the communication dsmoe_megatron does
without overlapping it: TP/SP collectives inside the node, the EP
all-to-alls (dispatch and combine, forward and backward) split into the bytes that stay on the
node's NVLink and those that cross the network, pipeline sends. Recompute runs the recomputed
forward (and its collectives) again. The step is the slowest rank's micro-batches plus the
pipeline bubble, (PP - 1) / VPP of a micro-batch, then the gradient reduction over data
parallelism (expert data parallelism for the routed experts; what the last micro-batch's backward
does not hide when it is overlapped, as dsmoe-train runs on GPUs) and the optimizer step.

Every rate below is an assumption, printed with the estimate; none is tuned to a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from dsmoe_megatron.config import ConfigError, DeepSeekMoEConfig
from dsmoe_megatron.planning.activations import (
    FP32,
    Micro,
    head_activations,
    layer_activations,
    mlp_recompute_covers_moe,
    routed_tokens,
)
from dsmoe_megatron.planning.hardware import Cluster
from dsmoe_megatron.planning.memory import recompute_modules, stage_chunks
from dsmoe_megatron.planning.params import LayerFlops, ParamCount, bytes_per_weight, layer_flops

COMPONENTS = ("GEMMs", "expert GEMMs", "attention", "element-wise", "recompute",
              "TP/SP collectives", "EP all-to-all (NVLink)", "EP all-to-all (network)",
              "PP send/recv", "pipeline bubble", "DP gradient sync", "expert-DP gradient sync",
              "optimizer step")


@dataclass(frozen=True)
class Rates:
    """What fraction of the hardware's peak each kind of work reaches (assumptions)."""
    gemm: float = 0.70
    """Dense GEMMs (projections, dense FFN, shared experts, output layer), of the peak."""
    grouped_gemm: float = 0.80
    """Routed experts' grouped GEMMs (many smaller GEMMs), relative to dense GEMMs."""
    fp8_gemm: float = 0.55
    """FP8 GEMMs, of the FP8 peak (casts and scaling included)."""
    attention: float = 0.50
    """Flash attention forward + backward, of the BF16 peak."""
    memory_passes: float = 4.0
    """Element-wise work moves this many times the bytes a layer keeps for its backward."""
    nvlink: float = 0.80
    network: float = 0.80
    """Of the link bandwidths that NCCL collectives reach."""
    latency: float = 20e-6
    """Per collective call (launch and synchronisation), seconds."""
    optimizer_bytes: float = 34.0
    """HBM bytes the Adam step and the gradient norm touch per local parameter shard."""
    overlap_grad_reduce: bool | None = None
    """Megatron DDP's overlap of the gradient reduction with the last backward; None: on, as
    dsmoe-train runs on GPUs unless the run sets overlap_grad_reduce: false."""

    def describe(self, fp8: bool, link: str) -> list[str]:
        """The rates in words; ``link``: the node's link (GPU.link)."""
        gemm = (f"FP8 GEMMs at {self.fp8_gemm:.0%} of the FP8 peak" if fp8
                else f"GEMMs at {self.gemm:.0%} of the BF16 peak")
        return [
            f"{gemm}, routed-expert grouped GEMMs at {self.grouped_gemm:.0%} of that, flash "
            f"attention at {self.attention:.0%} of the BF16 peak (causal: half the counted "
            "attention FLOPs), backward = 2 x forward; no GEMM faster than reading its weights "
            "from HBM (forward), and again with the fp32 gradient accumulation (backward)",
            f"element-wise work: {self.memory_passes:g} x the activation bytes kept, at the HBM "
            "bandwidth",
            f"collectives at {self.nvlink:.0%} of {link} / {self.network:.0%} of the network "
            f"bandwidth + {self.latency * 1e6:g} us each; ring algorithms; TP inside a node; "
            f"EP all-to-all: {link} and network bytes in parallel, balanced routing",
            "not overlapped with compute: TP, EP and PP communication (as dsmoe_megatron runs "
            "them); gradient reduction "
            + ("overlapped with the last backward (dsmoe-train's default on GPUs)"
               if self.overlap_grad_reduce is not False
               else "after the last backward (overlap_grad_reduce: false)"),
            f"optimizer: {self.optimizer_bytes:g} HBM bytes per local parameter shard; pipeline "
            "bubble (PP - 1) / VPP micro-batches of the slowest rank",
        ]


@dataclass(frozen=True)
class _Context:
    """What a layer's time depends on (hashable: per-layer times are cached across the many
    layouts a search estimates)."""
    m: Micro
    cluster: Cluster
    rates: Rates
    full_recompute: bool = False

    def gemm_rate(self) -> float:
        gpu = self.cluster.gpu
        if self.m.fp8:
            return gpu.fp8_flops * self.rates.fp8_gemm
        return gpu.bf16_flops * self.rates.gemm

    def link(self, intra: float, inter: float = 0.0) -> float:
        """Seconds to move ``intra`` bytes over NVLink and ``inter`` over the network, in
        parallel, as one collective."""
        gpu, r = self.cluster.gpu, self.rates
        return max(intra / (gpu.nvlink_bandwidth * r.nvlink),
                   inter / (gpu.network_bandwidth * r.network)) + r.latency

    def group_link(self, size: int, stride: int, nbytes: float) -> float:
        """A ring collective moving ``nbytes`` per GPU over a group of ``size`` ranks
        ``stride`` apart: NVLink inside a node, the network once it spans nodes."""
        if size == 1:
            return 0.0
        spans_nodes = size * stride > self.cluster.gpus_per_node
        return self.link(0, nbytes) if spans_nodes else self.link(nbytes)


def _add(out: dict, key: str, value: float) -> None:
    out[key] = out.get(key, 0.0) + value


def _gemm_time(ctx: _Context, flops: float, params: float, rate: float) -> tuple[float, float]:
    """(forward, backward) seconds of GEMMs of ``flops`` forward FLOPs at ``rate`` FLOP/s over
    ``params`` weights on this GPU. Neither pass is faster than its HBM traffic of the weights:
    the forward reads them; the backward reads them again (input gradient) and accumulates
    their gradient into the fp32 main_grad (read and write). With few tokens per weight (a GPU
    holding many experts, a small micro-batch), those bytes, not the FLOPs, set the time."""
    bandwidth = ctx.cluster.gpu.memory_bandwidth
    weights = params * ctx.m.act / bandwidth
    grads = params * 2 * FP32 / bandwidth
    return max(flops / rate, weights), max(2 * flops / rate, weights + grads)


def _tp_time(ctx: _Context, n_gather_scatter: int, n_all_reduce: int) -> float:
    """All-gathers / reduce-scatters and all-reduces of one [T, hidden] activation over TP."""
    m, calls = ctx.m, n_gather_scatter + n_all_reduce
    if m.tp == 1 or not calls:
        return 0.0
    volume = m.tokens * m.hidden * m.act * (m.tp - 1) / m.tp
    return ctx.group_link(m.tp, 1, volume * (n_gather_scatter + 2 * n_all_reduce)) + \
        (calls - 1) * ctx.rates.latency


def _tp_block(ctx: _Context) -> tuple[float, float]:
    """(forward, backward) TP time of one column + row parallel pair (attention or an MLP)."""
    if ctx.m.sp > 1:
        # gather before, reduce-scatter after; backward mirrors them and gathers the column
        # linear's input again for its weight gradient
        return _tp_time(ctx, 2, 0), _tp_time(ctx, 3, 0)
    return _tp_time(ctx, 0, 1), _tp_time(ctx, 0, 1)


def _routed_tp(ctx: _Context) -> tuple[float, float]:
    """TP traffic of the routed path (moe.py's table): tokens into and out of the experts."""
    m = ctx.m
    if m.tp == 1 or m.sp > 1 and m.etp == 1:
        return 0.0, 0.0
    if m.sp > 1:
        return _tp_time(ctx, 2, 0), _tp_time(ctx, 2, 0)
    if m.etp > 1:
        return _tp_time(ctx, 0, 1), _tp_time(ctx, 0, 1)
    return _tp_time(ctx, 1, 0), _tp_time(ctx, 1, 0)


def _all_to_all(ctx: _Context) -> tuple[float, float, float]:
    """(seconds, NVLink bytes, network bytes) of one EP all-to-all of the routed rows."""
    m = ctx.m
    if m.ep == 1:
        return 0.0, 0.0, 0.0
    nbytes = routed_tokens(m) * m.topk * m.hidden * m.act
    # EP ranks are expert-TP ranks apart (Megatron's expert rank order tp-ep-dp-pp)
    local = max(1, min(m.ep, ctx.cluster.gpus_per_node // m.etp))
    intra, inter = nbytes * (local - 1) / m.ep, nbytes * (m.ep - local) / m.ep
    return ctx.link(intra, inter), intra, inter


@lru_cache(maxsize=4096)
def layer_time(ctx: _Context, moe: bool, f: LayerFlops) -> tuple[dict, dict]:
    """Seconds of one layer for one micro-batch on one GPU (forward, backward, recompute) by
    component, and the EP all-to-all bytes it sends over NVLink and over the network. The
    dicts are cached: do not modify them."""
    m, r, gpu = ctx.m, ctx.rates, ctx.cluster.gpu
    T, t = m.tokens, m.tp
    gemm = ctx.gemm_rate()
    attention_fwd = T * f.attention / t / 2 / (gpu.bf16_flops * r.attention)
    # 2 FLOPs per multiply-add: a weight matrix's FLOPs per token are twice its parameters
    proj_fwd, proj_bwd = _gemm_time(ctx, T * f.projections / t, f.projections / 2 / t, gemm)
    mlp_fwd, mlp_bwd = _gemm_time(ctx, T * f.dense / t, f.dense / 2 / t, gemm)
    # this GPU's routed experts: experts / EP of them, each sharded over expert TP
    routed_params = f.routed / (2 * m.topk) * (m.experts // m.ep) / m.etp if moe else 0
    routed_fwd, routed_bwd = _gemm_time(ctx, T * f.routed / t, routed_params,
                                        gemm * r.grouped_gemm)
    plain = replace(m, recompute=frozenset())
    elementwise = r.memory_passes * sum(layer_activations(plain, moe).values()) \
        / gpu.memory_bandwidth
    out = {"GEMMs": proj_fwd + proj_bwd + mlp_fwd + mlp_bwd,
           "expert GEMMs": routed_fwd + routed_bwd,
           "attention": 3 * attention_fwd, "element-wise": elementwise}

    attn_tp = _tp_block(ctx)
    mlp_tp = _tp_block(ctx) if not moe or m.shared else (0.0, 0.0)
    routed_tp = _routed_tp(ctx) if moe else (0.0, 0.0)
    tp_fwd = attn_tp[0] + mlp_tp[0] + routed_tp[0]
    tp = tp_fwd + attn_tp[1] + mlp_tp[1] + routed_tp[1]
    a2a, intra, inter = _all_to_all(ctx) if moe else (0.0, 0.0, 0.0)
    a2a_calls = 4 if moe else 0

    # the forward again, for what is recomputed
    again = 0.0
    if ctx.full_recompute:
        again = proj_fwd + mlp_fwd + routed_fwd + attention_fwd + elementwise / r.memory_passes
        tp += tp_fwd
        a2a_calls += 2 if moe else 0
    else:
        if m.recomputes("core_attn"):
            again += attention_fwd
        block = m.recomputes("moe") or m.recomputes("mlp") and (
            not moe or mlp_recompute_covers_moe())
        if block:
            again += mlp_fwd + routed_fwd
            tp += mlp_tp[0] + routed_tp[0]
            a2a_calls += 2 if moe else 0
        elif moe and m.recomputes("shared_experts"):
            again += mlp_fwd
            tp += mlp_tp[0]
    out["recompute"] = again
    out["TP/SP collectives"] = tp
    nvlink_share = intra / (intra + inter) if intra + inter else 0.0
    out["EP all-to-all (NVLink)"] = a2a_calls * a2a * nvlink_share
    out["EP all-to-all (network)"] = a2a_calls * a2a * (1 - nvlink_share)
    return out, {"nvlink": a2a_calls * intra, "network": a2a_calls * inter}


def _head_time(ctx: _Context, hidden: int, vocab_rows: int) -> dict[str, float]:
    """The output layer and the loss, on the last pipeline rank."""
    m, gpu = ctx.m, ctx.cluster.gpu
    forward = m.tokens * 2 * vocab_rows * hidden / m.tp
    fwd, bwd = _tp_block(ctx)
    return {"GEMMs": sum(_gemm_time(ctx, forward, vocab_rows * hidden / m.tp,
                                    gpu.bf16_flops * ctx.rates.gemm)),
            "element-wise": ctx.rates.memory_passes * head_activations(m, vocab_rows)
            / gpu.memory_bandwidth,
            "TP/SP collectives": (fwd + bwd) / 2}  # one column-parallel linear


def _stage_time(ctx: _Context, flops: dict, pattern: list[bool], chunks: list[list[int]],
                first: bool, last: bool, vocab_rows: int, block: int | None = None
                ) -> tuple[dict, dict]:
    """Seconds of one micro-batch through all model chunks of one pipeline rank, and its EP
    all-to-all bytes."""
    m = ctx.m
    times: dict[str, float] = {}
    traffic: dict[str, float] = {}
    # full recompute with the block method redoes only the first ``block`` layers of a chunk
    counts: dict[tuple[bool, bool], int] = {}
    for chunk in chunks:
        for j, i in enumerate(chunk):
            key = (pattern[i], ctx.full_recompute and (block is None or j < block))
            counts[key] = counts.get(key, 0) + 1
    for (moe, recomputed), count in sorted(counts.items()):
        layer, sent = layer_time(replace(ctx, full_recompute=recomputed), moe, flops[moe])
        for key, value in layer.items():
            _add(times, key, count * value)
        for key, value in sent.items():
            _add(traffic, key, count * value)
    if last:
        for key, value in _head_time(ctx, m.hidden, vocab_rows).items():
            _add(times, key, value)
    return times, traffic


def estimate_step_time(cfg: DeepSeekMoEConfig, params: ParamCount, cluster: Cluster, seq: int,
                       batch: int, microbatches: int, memory: dict, flops_per_step: float,
                       rates: Rates = Rates(), impl: str = "te") -> dict:
    """Step time on ``cluster`` for the layout in ``cfg``; ``memory``: estimate_memory's dict;
    ``flops_per_step``: the model's training FLOPs per step (params.FLOPS_CONVENTION), for MFU."""
    if cfg.fp8 and impl == "te" and cluster.gpu.fp8_flops is None:
        raise ConfigError(f"fp8={cfg.fp8!r}: {cluster.gpu.name} has no FP8 tensor cores; set "
                          "fp8: null or plan for another GPU")
    world, p = cluster.num_gpus, cfg.pipeline_model_parallel_size
    vpp = cfg.virtual_pipeline_model_parallel_size or 1
    m = Micro.of(cfg, seq, batch, impl, recompute_modules(cfg))
    ctx = _Context(m, cluster, rates, cfg.recompute_granularity == "full")
    block = cfg.recompute_num_layers if cfg.recompute_method == "block" else None
    dp, edp = world // (m.tp * p), world // (m.etp * m.ep * p)
    pattern = cfg.moe_layer_pattern()
    flops = {moe: layer_flops(cfg, moe, seq) for moe in set(pattern)}
    stages = []
    for s, chunks in enumerate(stage_chunks(cfg)):
        times, traffic = _stage_time(ctx, flops, pattern, chunks, s == 0, s == p - 1,
                                     params.padded_vocab_size, block)
        if p > 1:
            times["PP send/recv"] = _pipeline_sends(ctx, p, len(chunks), s == 0, s == p - 1)
        stages.append((times, traffic))
    slowest = max(range(p), key=lambda s: sum(stages[s][0].values()))
    micro, traffic = stages[slowest]
    per_micro = sum(micro.values())
    breakdown = {key: microbatches * micro.get(key, 0.0) for key in COMPONENTS}
    breakdown["pipeline bubble"] = (p - 1) / vpp * per_micro

    weight_bytes = bytes_per_weight(cfg)
    distributed = memory["distributed_optimizer"]
    tails = []
    for s, stage in enumerate(memory["stages"]):
        # what an overlapped gradient reduction hides behind: the last micro-batch's backward
        backward = sum(v for k, v in stages[s][0].items() if k != "PP send/recv") * 2 / 3
        # one window for both reductions, timed one after the other as without the overlap
        window = [backward]

        def sync(n_params: int, size: int, stride: int) -> float:
            if size == 1:
                return 0.0
            grads = n_params * 4 * (size - 1) / size
            if distributed:  # reduce-scatter the fp32 gradients, all-gather the parameters
                gather = n_params * weight_bytes * (size - 1) / size
                exposed = ctx.group_link(size, stride, grads) + \
                    ctx.group_link(size, stride, gather)
            else:
                exposed = ctx.group_link(size, stride, 2 * grads)
            if rates.overlap_grad_reduce is False:
                return exposed
            hidden = min(exposed, window[0])
            window[0] -= hidden
            return exposed - hidden

        shards = (dp, edp) if distributed else (1, 1)
        local = stage.dense_params / shards[0] + stage.expert_params / shards[1]
        tails.append({"DP gradient sync": sync(stage.dense_params, dp, m.tp),
                      "expert-DP gradient sync": sync(stage.expert_params, edp, m.etp * m.ep),
                      "optimizer step": rates.optimizer_bytes * local
                      / cluster.gpu.memory_bandwidth})
    breakdown.update(max(tails, key=lambda d: sum(d.values())))
    step = sum(breakdown.values())
    tokens = microbatches * batch * seq * dp
    return {
        "gpu": cluster.gpu.name,
        "num_gpus": world,
        "num_nodes": cluster.num_nodes,
        "step_time": step,
        "breakdown": breakdown,
        "slowest_stage": slowest,
        "tokens_per_step": tokens,
        "tokens_per_second_per_gpu": tokens / step / world,
        "model_tflops_per_gpu": flops_per_step / step / world / 1e12,
        "mfu": flops_per_step / (step * world * cluster.gpu.bf16_flops),
        "ep_alltoall_bytes_per_step": {k: microbatches * traffic.get(k, 0.0)
                                       for k in ("nvlink", "network")},
    }


def _pipeline_sends(ctx: _Context, pp: int, chunks: int, first: bool, last: bool) -> float:
    """Activations forward and gradients backward across every chunk boundary of one rank."""
    m, cluster = ctx.m, ctx.cluster
    nbytes = m.tokens / m.sp * m.hidden * m.act
    sends = 2 * chunks - (1 if first else 0) - (1 if last else 0)
    # neighbouring stages are world / PP ranks apart: on another node once that is a node
    remote = cluster.num_gpus // pp >= cluster.gpus_per_node
    return sends * (ctx.link(0, nbytes) if remote else ctx.link(nbytes))
