"""Parameters and training FLOPs of the model a run config describes, without building it.

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

from dataclasses import dataclass, field

from dsmoe_megatron.config import DeepSeekMoEConfig

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


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs per token of one layer (2 per multiply-add), by the kind of work."""
    projections: int     # q, k, v, o
    attention: int       # QK^T and (scores)V over the whole sequence, no causal discount
    dense: int           # the dense FFN, or the shared experts: TP-sharded GEMMs
    routed: int          # the top-k routed experts: grouped GEMMs

    @property
    def total(self) -> int:
        return self.projections + self.attention + self.dense + self.routed


def bytes_per_weight(cfg: DeepSeekMoEConfig) -> int:
    """Bytes per weight: 2 for bf16 and fp16 models, 4 for fp32."""
    return 2 if cfg.bf16 or cfg.fp16 else 4


def layer_flops(cfg: DeepSeekMoEConfig, moe: bool, seq_length: int) -> LayerFlops:
    h = cfg.hidden_size
    q_width = cfg.num_attention_heads * cfg.kv_channels
    kv_width = cfg.num_query_groups * cfg.kv_channels
    fc = 2 if cfg.gated_linear_unit else 1
    dense = (cfg.moe_shared_expert_intermediate_size or 0) if moe else cfg.ffn_hidden_size
    routed = cfg.moe_router_topk * cfg.moe_ffn_hidden_size if moe else 0
    return LayerFlops(projections=2 * (h * (q_width + 2 * kv_width) + q_width * h),
                      attention=2 * 2 * seq_length * q_width,
                      dense=2 * (fc + 1) * h * dense, routed=2 * (fc + 1) * h * routed)


def flops_per_token(cfg: DeepSeekMoEConfig, vocab_rows: int, seq_length: int) -> int:
    """Training FLOPs per token (FLOPS_CONVENTION); ``vocab_rows``: the padded vocabulary."""
    forward = 2 * vocab_rows * cfg.hidden_size
    forward += sum(layer_flops(cfg, moe, seq_length).total for moe in cfg.moe_layer_pattern())
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
