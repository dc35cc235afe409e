"""dsmoe-plan: parameters, compute and per-GPU memory of a run config, without building anything.

    dsmoe-plan yaml_configs/deepseekmoe_16b.yaml --world-size 128
    dsmoe-plan yaml_configs/tiny.yaml language_model.num_layers=8 --json
    python -m dsmoe_megatron.plan CONFIG [overrides] [--json] [--world-size N]

Parameters are those of the model the trainer builds (Megatron-core GPTModel, untied input
embedding and output layer, RoPE, RMSNorm, SwiGLU, vocabulary padded as
``dsmoe_megatron.model.padded_vocab_size`` does). Activated parameters per token: everything
except the routed experts a token does not visit (embedding rows and routers included), the
paper's "# Activated Params".

Training FLOPs are counted with the convention of DeepSeek LLM (arXiv 2401.02954), which the
DeepSeekMoE paper's "FLOPs per 4K tokens" follow: 3 x the forward matmul FLOPs (2 per
multiply-add) of the attention projections, the attention scores and weighted sum over the whole
sequence (12 * layers * d_attn * seq per token; no causal-mask discount), the activated FFNs and
the output layer; routers, norms, RoPE and element-wise work are not counted. With the
configured widths this reproduces the paper's 2B (4.3T per 2K tokens) and 145B (585.6T per 4K)
figures. For DeepSeekMoE 16B the paper prints 74.4T, which is the same formula evaluated on the
*nominal* sizes (each FFN a multiple of a "standard FFN" of 8/3 * hidden, an expert 1/m of
one) instead of the real expert width 1408 (75.8T); both are reported (``nominal_*``). The
nominal count also gives the paper's dense and GShard baselines (DeepSeek 7B 183.5T, LLaMA2 7B
187.9T, DeepSeek 67B 2057.5T, GShard 137B 572.7T, the 2B tables).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from dataclasses import asdict, dataclass, field

from dsmoe_megatron.cli import quiet_warnings
from dsmoe_megatron.config import DeepSeekMoEConfig
from dsmoe_megatron.yaml_config import RunConfig, check_world_size, load_run_config

TOKENS_4K = 4096
FLOPS_CONVENTION = (
    "training FLOPs = 3 x forward (fwd + bwd), 2 FLOPs per multiply-add; counted: attention "
    "q/k/v/o projections, attention scores + weighted sum over the full sequence "
    "(12 x layers x heads x head_dim x seq per token, no causal discount), activated FFNs "
    "(dense layers; shared + top-k routed experts), output layer; not counted: routers, "
    "norms, RoPE, softmax and other element-wise work, activation recomputation "
    "(DeepSeek LLM's convention, as in the DeepSeekMoE paper)")
NOMINAL_CONVENTION = (
    "the same count on idealised sizes, as the paper's tables mostly do: 6 x layers x d^2 x "
    "(4 + 8 x r) + 12 x layers x d x seq + 6 x vocab x d per token, r = activated FFN size in "
    "standard FFNs of 8/3 x d (an expert of width ~ standard/m counts 1/m, wider FFNs the "
    "nearest half multiple), vocab unpadded; reproduces the paper's 16B figure (74.4T) and "
    "its dense and GShard baselines")


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass
class LayerParams:
    """Parameters of one transformer layer, split the way they are sharded."""
    moe: bool
    attention: int          # q, k, v, o (+ biases, q/k norms): TP-sharded
    norms: int              # input and pre-MLP norms: replicated
    ffn: int                # dense FFN or shared experts: TP-sharded
    router: int             # replicated
    routed: int             # all routed experts: EP x ETP-sharded
    routed_activated: int   # the top-k a token visits

    @property
    def total(self) -> int:
        return self.attention + self.norms + self.ffn + self.router + self.routed

    @property
    def activated(self) -> int:
        return self.attention + self.norms + self.ffn + self.router + self.routed_activated


@dataclass
class ParamCount:
    vocab_size: int
    padded_vocab_size: int
    embedding: int
    output_layer: int
    final_norm: int
    layers: list[LayerParams] = field(repr=False)

    def _sum(self, name: str) -> int:
        return sum(getattr(layer, name) for layer in self.layers)

    @property
    def total(self) -> int:
        return self.embedding + self.output_layer + self.final_norm + self._sum("total")

    @property
    def activated(self) -> int:
        return self.embedding + self.output_layer + self.final_norm + self._sum("activated")

    def breakdown(self) -> dict[str, tuple[int, int]]:
        """name -> (total, activated per token)."""
        dense_ffn = sum(layer.ffn for layer in self.layers if not layer.moe)
        shared = sum(layer.ffn for layer in self.layers if layer.moe)
        return {
            "embedding": (self.embedding, self.embedding),
            "output layer": (self.output_layer, self.output_layer),
            "attention": (self._sum("attention"),) * 2,
            "norms": (self._sum("norms") + self.final_norm,) * 2,
            "dense FFNs": (dense_ffn, dense_ffn),
            "routers": (self._sum("router"),) * 2,
            "shared experts": (shared, shared),
            "routed experts": (self._sum("routed"), self._sum("routed_activated")),
        }


def _swiglu(cfg: DeepSeekMoEConfig, hidden: int, width: int) -> int:
    """fc1 (gate and up when gated) + fc2, with biases when add_bias_linear."""
    fc1_out = 2 * width if cfg.gated_linear_unit else width
    params = hidden * fc1_out + width * hidden
    if cfg.add_bias_linear:
        params += fc1_out + hidden
    return params


def _norm(cfg: DeepSeekMoEConfig, width: int) -> int:
    return width if cfg.normalization == "RMSNorm" else 2 * width


def count_params(cfg: DeepSeekMoEConfig, vocab_size: int) -> ParamCount:
    """Parameters of the GPTModel the trainer builds for ``cfg`` (untied embeddings, RoPE)."""
    h = cfg.hidden_size
    kv = cfg.kv_channels
    q_width = cfg.num_attention_heads * kv
    kv_width = cfg.num_query_groups * kv
    attention = h * (q_width + 2 * kv_width) + q_width * h
    if cfg.add_bias_linear or cfg.add_qkv_bias:
        attention += q_width + 2 * kv_width
    if cfg.add_bias_linear:
        attention += h
    if cfg.qk_layernorm:
        attention += 2 * _norm(cfg, kv)
    norms = 2 * _norm(cfg, h)
    layers = []
    for is_moe in cfg.moe_layer_pattern():
        if not is_moe:
            layers.append(LayerParams(False, attention, norms, _swiglu(cfg, h, cfg.ffn_hidden_size),
                                      0, 0, 0))
            continue
        n, k, width = cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size
        shared = cfg.moe_shared_expert_intermediate_size or 0
        shared_params = _swiglu(cfg, h, shared) if shared else 0
        if shared and cfg.moe_shared_expert_gate:
            shared_params += h
        expert = _swiglu(cfg, h, width)
        layers.append(LayerParams(True, attention, norms, shared_params, n * h, n * expert,
                                  k * expert))
    from dsmoe_megatron.model import padded_vocab_size  # the trainer's padding rule

    padded = padded_vocab_size(vocab_size, cfg.tensor_model_parallel_size)
    return ParamCount(vocab_size=vocab_size, padded_vocab_size=padded, embedding=padded * h,
                      output_layer=padded * h, final_norm=_norm(cfg, h), layers=layers)


# ---------------------------------------------------------------------------------------------
# Compute


def flops_per_token(cfg: DeepSeekMoEConfig, vocab_rows: int, seq_length: int) -> int:
    """Training FLOPs per token (FLOPS_CONVENTION); ``vocab_rows``: the padded vocabulary."""
    h = cfg.hidden_size
    q_width = cfg.num_attention_heads * cfg.kv_channels
    kv_width = cfg.num_query_groups * cfg.kv_channels
    fc = 2 if cfg.gated_linear_unit else 1
    forward = 2 * vocab_rows * h
    for is_moe in cfg.moe_layer_pattern():
        forward += 2 * (h * (q_width + 2 * kv_width) + q_width * h)  # projections
        forward += 2 * 2 * seq_length * q_width                      # QK^T and (scores)V
        if is_moe:
            width = (cfg.moe_router_topk * cfg.moe_ffn_hidden_size
                     + (cfg.moe_shared_expert_intermediate_size or 0))
        else:
            width = cfg.ffn_hidden_size
        forward += 2 * (fc + 1) * h * width
    return 3 * forward


def nominal_ffn_size(width: int, hidden: int) -> float:
    """An FFN's size in standard FFNs (8/3 x hidden wide), idealised as the paper does.

    At least one standard FFN: the nearest multiple of 1/2; below: the nearest fraction 1/m
    (an expert of a fine-grained segmentation by m, before its width was aligned).
    """
    x = width / (8 * hidden / 3)
    if x >= 0.75:
        return max(1.0, round(2 * x) / 2)
    return 1 / round(1 / x)


def nominal_flops_per_token(cfg: DeepSeekMoEConfig, vocab_size: int, seq_length: int) -> float:
    """The paper's idealised count (NOMINAL_CONVENTION); ``vocab_size``: the real vocabulary."""
    d = cfg.hidden_size
    total = 0.0
    for is_moe in cfg.moe_layer_pattern():
        if is_moe:
            experts = cfg.moe_router_topk + cfg.moe_num_shared_experts
            r = experts * nominal_ffn_size(cfg.moe_ffn_hidden_size, d)
        else:
            r = nominal_ffn_size(cfg.ffn_hidden_size, d)
        total += 6 * d * d * (4 + 8 * r) + 12 * d * seq_length
    return total + 6 * vocab_size * d


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass
class StageMemory:
    stage: int
    layers: int
    params: int               # parameters held by one GPU of this stage
    dense_params: int         # of which replicated over data parallelism
    expert_params: int        # of which replicated over expert data parallelism
    weights: float            # bytes
    grads: float
    optimizer: float
    activations: float
    in_flight_microbatches: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def stage_layers(cfg: DeepSeekMoEConfig) -> list[list[int]]:
    """Layer indices of each pipeline stage (all its virtual chunks), as Megatron splits them."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    p = cfg.pipeline_model_parallel_size
    vpp = cfg.virtual_pipeline_model_parallel_size
    stages = []
    for rank in range(p):
        layers = []
        for vp_stage in range(vpp) if vpp else [None]:
            offset = get_transformer_layer_offset(cfg, vp_stage=vp_stage, pp_rank=rank)
            count = get_num_layers_to_build(cfg, vp_stage=vp_stage, pp_rank=rank)
            layers += range(offset, offset + count)
        stages.append(layers)
    return stages


def _activation_bytes_per_token(cfg: DeepSeekMoEConfig, layer: LayerParams, act_bytes: int
                                ) -> float:
    """Bytes of activations one layer keeps per token for the backward pass (one GPU).

    Fused (flash) attention: no seq x seq score matrix is stored. With sequence parallelism the
    norm inputs/outputs are split over TP; tokens routed to experts are counted k times (each
    EP rank receives, on average, as many token copies as it sends).
    """
    h, t = cfg.hidden_size, cfg.tensor_model_parallel_size
    sp = t if cfg.sequence_parallel else 1
    etp = cfg.expert_tensor_parallel_size or t
    kv = cfg.kv_channels
    q_width, kv_width = cfg.num_attention_heads * kv, cfg.num_query_groups * kv
    fc = 2 if cfg.gated_linear_unit else 1
    b = act_bytes
    # input norm: input + output; q, k, v; attention output (the o-projection input)
    total = b * (2 * h / sp + (q_width + 2 * kv_width) / t + q_width / t)
    # pre-MLP norm: input + output
    total += b * 2 * h / sp
    for dropout in (cfg.hidden_dropout, cfg.attention_dropout):
        if dropout:
            total += h / sp  # one-byte masks
    if not layer.moe:
        total += b * (fc + 1) * cfg.ffn_hidden_size / t
        return total
    shared = cfg.moe_shared_expert_intermediate_size or 0
    total += b * (fc + 1) * shared / t
    total += 4 * 2 * cfg.num_moe_experts / sp  # fp32 router logits and probabilities
    k, w = cfg.moe_router_topk, cfg.moe_ffn_hidden_size
    # per routed copy: expert input and output rows, fc1 output and activation
    total += b * k * (2 * h + (fc + 1) * w / etp) / sp
    return total


def estimate_memory(run: RunConfig, params: ParamCount, world_size: int) -> dict:
    cfg, train = run.model, run.train
    t, p = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    ep = cfg.expert_model_parallel_size
    etp = cfg.expert_tensor_parallel_size or t
    vpp = cfg.virtual_pipeline_model_parallel_size or 1
    dp = world_size // (t * p)
    edp = world_size // (etp * ep * p)
    microbatches = train.num_microbatches(dp)
    weight_bytes = 2 if cfg.bf16 or cfg.fp16 else 4
    # distributed optimizer: fp32 main params (not for fp32 models) + Adam's two moments
    opt_bytes = (4 if weight_bytes == 2 else 0) + 8
    tokens = train.micro_batch_size * train.seq_length
    stages = []
    for s, layer_ids in enumerate(stage_layers(cfg)):
        dense = expert = 0
        act = 0.0
        for i in layer_ids:
            layer = params.layers[i]
            dense += (layer.attention + layer.ffn) // t + layer.norms + layer.router
            expert += layer.routed // (ep * etp)
            act += _activation_bytes_per_token(cfg, layer, weight_bytes) * tokens
        if s == 0:
            dense += params.embedding // t
        if s == p - 1:
            dense += params.output_layer // t + params.final_norm
            # logits (activation dtype) and their fp32 copy for the vocab-parallel loss
            logits = tokens * params.padded_vocab_size / t * (weight_bytes + 4)
        else:
            logits = 0.0
        # 1F1B: stage s holds up to p - s micro-batches; interleaving adds (p-1)/(p*vpp) more
        in_flight = min(microbatches, p - s)
        if vpp > 1:
            in_flight *= 1 + (p - 1) / (p * vpp)
        total_params = dense + expert
        stages.append(StageMemory(
            stage=s, layers=len(layer_ids), params=total_params, dense_params=dense,
            expert_params=expert, weights=total_params * weight_bytes, grads=total_params * 4,
            optimizer=dense * opt_bytes / dp + expert * opt_bytes / edp,
            activations=act * in_flight + logits, in_flight_microbatches=in_flight))
    worst = max(stages, key=lambda st: st.total)
    return {
        "world_size": world_size,
        "data_parallel_size": dp,
        "expert_data_parallel_size": edp,
        "num_microbatches": microbatches,
        "stages": [dict(asdict(st), total=st.total) for st in stages],
        "max_bytes_per_gpu": worst.total,
        "max_stage": worst.stage,
        "assumptions": [
            f"weights in {'bf16/fp16' if weight_bytes == 2 else 'fp32'} "
            f"({weight_bytes} bytes), gradients in an fp32 buffer (4 bytes)",
            "Megatron distributed optimizer: "
            + ("fp32 main params + " if weight_bytes == 2 else "")
            + "Adam moments (fp32), sharded over data parallelism (dense parameters) and "
              "expert data parallelism (routed experts)",
            "activations: fused (flash) attention, no recomputation, balanced routing; "
            "1F1B pipeline schedule (stage s holds min(microbatches, PP - s) micro-batches)",
            "not included: CUDA context, communication buffers, allocator fragmentation "
            "(typically a few GB)",
        ],
    }


def minimal_world_size(run: RunConfig) -> int:
    """The smallest world the layout fits (no data parallelism beyond what EP needs)."""
    cfg = run.model
    t, p = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    etp = cfg.expert_tensor_parallel_size or t
    return math.lcm(t * p, etp * cfg.expert_model_parallel_size * p)


# ---------------------------------------------------------------------------------------------
# The plan


def make_plan(run: RunConfig, world_size: int | None = None) -> dict:
    cfg, train = run.model, run.train
    defaulted = world_size is None
    if defaulted:
        world_size = minimal_world_size(run)
    check_world_size(run, world_size)
    params = count_params(cfg, train.vocab_size)
    per_token = flops_per_token(cfg, params.padded_vocab_size, train.seq_length)
    nominal = nominal_flops_per_token(cfg, params.vocab_size, train.seq_length)
    pattern = cfg.moe_layer_pattern()
    plan = {
        "total_params": params.total,
        "activated_params": params.activated,
        "non_embedding_params": params.total - params.embedding - params.output_layer,
        "params": {name: {"total": tot, "activated": act}
                   for name, (tot, act) in params.breakdown().items()},
        "vocab_size": params.vocab_size,
        "padded_vocab_size": params.padded_vocab_size,
        "num_layers": cfg.num_layers,
        "num_moe_layers": sum(pattern),
        "seq_length": train.seq_length,
        "flops_per_token": per_token,
        "flops_per_4k_tokens": per_token * TOKENS_4K,
        "flops_per_sequence": per_token * train.seq_length,
        "nominal_flops_per_token": nominal,
        "nominal_flops_per_4k_tokens": nominal * TOKENS_4K,
        "flops_convention": FLOPS_CONVENTION,
        "nominal_flops_convention": NOMINAL_CONVENTION,
        "tokens_per_step": train.global_batch(world_size // (cfg.tensor_model_parallel_size
                                                             * cfg.pipeline_model_parallel_size))
        * train.seq_length,
        "layout": {
            "tensor": cfg.tensor_model_parallel_size,
            "pipeline": cfg.pipeline_model_parallel_size,
            "virtual_pipeline": cfg.virtual_pipeline_model_parallel_size,
            "expert": cfg.expert_model_parallel_size,
            "expert_tensor": cfg.expert_tensor_parallel_size,
            "sequence_parallel": cfg.sequence_parallel,
        },
        "memory": estimate_memory(run, params, world_size),
    }
    plan["memory"]["world_size_defaulted"] = defaulted
    plan["flops_per_step"] = per_token * plan["tokens_per_step"]
    return plan


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{prefix}{unit}"
    return f"{value:.4g}{unit}"


def _params(value: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3f}{suffix}"
    return str(value)


def _mem(value: float, unit: float) -> str:
    return f"{value / unit:.1f}"


def format_plan(plan: dict, config_path: str) -> str:
    lay, mem = plan["layout"], plan["memory"]
    lines = [f"dsmoe-plan: {config_path}", ""]
    dense = plan["num_layers"] - plan["num_moe_layers"]
    lines.append(f"Model: {plan['num_layers']} layers ({dense} dense + "
                 f"{plan['num_moe_layers']} MoE), vocabulary {plan['vocab_size']} "
                 f"(padded to {plan['padded_vocab_size']}), sequence {plan['seq_length']}")
    lines.append("")
    lines.append(f"{'Parameters':<22}{'total':>16}{'activated/token':>18}")
    for name, row in plan["params"].items():
        if row["total"]:
            lines.append(f"  {name:<20}{_params(row['total']):>16}{_params(row['activated']):>18}")
    lines.append(f"  {'all':<20}{_params(plan['total_params']):>16}"
                 f"{_params(plan['activated_params']):>18}")
    lines += textwrap.wrap(
        f"({plan['total_params']:,} total, {plan['activated_params']:,} activated; untied "
        "embedding and output layer, padded vocabulary rows included; activated = all but the "
        "routed experts a token does not visit)", 96, initial_indent="  ",
        subsequent_indent="   ")
    lines.append("")
    lines.append("Training compute")
    lines.append(f"  per token            {_si(plan['flops_per_token'], 'FLOPs')}")
    lines.append(f"  per 4K tokens        {_si(plan['flops_per_4k_tokens'], 'FLOPs')}"
                 f"   (attention at sequence {plan['seq_length']})")
    lines.append(f"  per sequence         {_si(plan['flops_per_sequence'], 'FLOPs')}"
                 f"   ({plan['seq_length']} tokens)")
    lines.append(f"  per step             {_si(plan['flops_per_step'], 'FLOPs')}"
                 f"   ({plan['tokens_per_step']:,} tokens)")
    lines.append(f"  nominal per 4K       {_si(plan['nominal_flops_per_4k_tokens'], 'FLOPs')}")
    lines += textwrap.wrap(f"counted as: {plan['flops_convention']}", 96,
                           initial_indent="  ", subsequent_indent="    ")
    lines += textwrap.wrap(f"nominal: {plan['nominal_flops_convention']}", 96,
                           initial_indent="  ", subsequent_indent="    ")
    lines.append("")
    vpp = f" VPP{lay['virtual_pipeline']}" if lay["virtual_pipeline"] else ""
    unit, unit_name = (2**30, "GiB") if mem["max_bytes_per_gpu"] >= 2**30 else (2**20, "MiB")
    lines.append(
        f"Memory per GPU ({unit_name}): world {mem['world_size']} = TP{lay['tensor']} x "
        f"PP{lay['pipeline']}{vpp} x DP{mem['data_parallel_size']}; EP{lay['expert']} x "
        f"ETP{lay['expert_tensor']}, expert DP {mem['expert_data_parallel_size']}; "
        f"SP {'on' if lay['sequence_parallel'] else 'off'}; "
        f"{mem['num_microbatches']} micro-batches per step")
    lines.append(f"  {'stage':>5}{'layers':>7}{'params':>11}{'weights':>9}{'grads':>8}"
                 f"{'optim':>8}{'activ':>8}{'total':>8}")
    for st in mem["stages"]:
        lines.append(f"  {st['stage']:>5}{st['layers']:>7}{_params(st['params']):>11}"
                     + "".join(f"{_mem(st[k], unit):>{w}}" for k, w in (
                         ("weights", 9), ("grads", 8), ("optimizer", 8), ("activations", 8),
                         ("total", 8))))
    lines.append(f"  peak: {_mem(mem['max_bytes_per_gpu'], unit)} {unit_name} on stage "
                 f"{mem['max_stage']}")
    if mem.get("world_size_defaulted"):
        lines.append("  - world size: the smallest this layout fits (least optimizer sharding); "
                     "pass --world-size for your cluster")
    for note in mem["assumptions"]:
        lines += textwrap.wrap(note, 96, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dsmoe-plan",
        description="Parameters, training FLOPs and per-GPU memory of a dsmoe_megatron run config.")
    parser.add_argument("config", help="run config YAML (e.g. yaml_configs/deepseekmoe_16b.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides (language_model.num_layers=4, lr=1e-3, ...)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs for the memory estimate (default: the smallest world the "
                             "layout fits)")
    args = parser.parse_intermixed_args(quiet_warnings(argv))
    try:
        run = load_run_config(args.config, args.overrides, instantiate_checks=False)
        plan = make_plan(run, args.world_size)
    except ValueError as err:
        print(f"dsmoe-plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan))
    else:
        print(format_plan(plan, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
