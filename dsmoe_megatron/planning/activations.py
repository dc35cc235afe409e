"""Activation memory of one transformer layer: what its forward keeps for the backward pass.

Bytes for one micro-batch on one GPU, split by component; each component lists the tensors the
code it describes saves, so a change to that code changes one function here. Two
implementations of the same layers:

- ``te``: what the trainer builds on a GPU: Transformer Engine linears and norms (the norm
  before a TE linear fused into it), fused (flash) attention, TE grouped GEMMs for the experts,
  FP8 GEMM inputs when ``fp8`` is set. Modelled from the code, not measured here.
- ``local``: what it builds without TE (the CPU): Megatron-core's local linears, unfused
  attention, dsmoe_megatron.norm.RMSNorm. ``tests/test_plan_activations.py`` checks it against
  the tensors autograd saves (planning/measure.py).

Notation: T = seq x batch tokens of the micro-batch; sp = TP size under sequence parallelism,
else 1 (norms and the residual hold T/sp tokens); attention and the dense MLP see all T tokens
with 1/TP of the heads or width; a = bytes per activation element; the router and the balance
losses work in fp32. Selective recompute uses Megatron-core's ``recompute_modules`` names; full
recompute is applied per pipeline chunk by ``memory.py`` (the layer then keeps only its input).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from dsmoe_megatron.config import DeepSeekMoEConfig

FP32, INDEX = 4, 8  # router / balance-loss floats; int64 indices


@dataclass(frozen=True)
class Micro:
    """One micro-batch of one layer on one GPU: every size the kept activations depend on."""
    seq: int
    batch: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    shared: int          # shared experts' total width (0: none)
    experts: int         # routed experts (0: dense model)
    topk: int
    expert_width: int
    tp: int
    sp: int              # TP size under sequence parallelism, else 1
    etp: int
    ep: int
    act: int             # bytes per activation element
    fp8: bool            # TE FP8 GEMMs
    impl: str = "te"
    attention_dropout: bool = False
    hidden_dropout: bool = False
    fused_swiglu: bool = False
    balance_loss: bool = True
    recompute: frozenset = frozenset()
    """Selective recompute: Megatron's ``recompute_modules`` in effect for this layer."""

    @classmethod
    def of(cls, cfg: DeepSeekMoEConfig, seq: int, batch: int, impl: str = "te",
           recompute: frozenset = frozenset()) -> Micro:
        tp = cfg.tensor_model_parallel_size
        return cls(
            seq=seq, batch=batch, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
            groups=cfg.num_query_groups, head_dim=cfg.kv_channels, ffn=cfg.ffn_hidden_size,
            shared=cfg.moe_shared_expert_intermediate_size or 0,
            experts=cfg.num_moe_experts or 0, topk=cfg.moe_router_topk or 0,
            expert_width=cfg.moe_ffn_hidden_size or 0, tp=tp,
            sp=tp if cfg.sequence_parallel else 1, etp=cfg.expert_tensor_parallel_size or tp,
            ep=cfg.expert_model_parallel_size, act=2 if cfg.bf16 or cfg.fp16 else 4,
            fp8=bool(cfg.fp8) and impl == "te", impl=impl,
            attention_dropout=bool(cfg.attention_dropout),
            hidden_dropout=bool(cfg.hidden_dropout), fused_swiglu=cfg.bias_activation_fusion,
            balance_loss=bool(cfg.moe_aux_loss_coeff or cfg.moe_device_balance_coeff),
            recompute=frozenset(recompute))

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def gemm_input(self) -> int:
        """Bytes per element a TE linear keeps of its input: its FP8 copy under FP8."""
        return 1 if self.fp8 else self.act

    def recomputes(self, module: str) -> bool:
        return module in self.recompute


@lru_cache(maxsize=4096)
def layer_activations(m: Micro, moe: bool) -> dict[str, float]:
    """Component -> bytes kept for the backward of one layer (dense or DeepSeekMoE). The dict
    is cached: do not modify it."""
    out = {"input norm": input_norm(m), "attention": attention(m),
           "residual dropout": residual_dropout(m)}
    if moe:
        out["pre-MLP norm"] = pre_mlp_norm(m, moe=True)
        if m.recomputes("mlp") and mlp_recompute_covers_moe() or m.recomputes("moe"):
            return out  # the checkpoint keeps the block's input: the norm output, counted above
        out.update(router=router(m), **{"shared experts": shared_experts(m),
                                        "routed experts": routed_experts(m),
                                        "EP dispatch": ep_dispatch(m)})
        return out
    out["pre-MLP norm"] = pre_mlp_norm(m, moe=False)
    out["MLP"] = 0.0 if m.recomputes("mlp") else swiglu_mlp(m, m.ffn)
    return out


@lru_cache(maxsize=1)
def mlp_recompute_covers_moe() -> bool:
    """Megatron's TransformerLayer applies ``mlp`` recompute to every MLP that is not one of its
    own MoELayers, so to the DeepSeekMoE block too unless that becomes a MoELayer."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from dsmoe_megatron.moe import DeepSeekMoE

    return not issubclass(DeepSeekMoE, MoELayer)


# ---------------------------------------------------------------------------------------------
# Norms


def _norm(m: Micro, output: float) -> float:
    """A norm over this GPU's T/sp tokens: what it keeps, plus ``output`` bytes per element of
    its output kept by the layers that read it.

    local RMSNorm works in fp32: its input (a copy unless fp32 already), the normalised rows,
    1/rms per token and the weight's fp32 copy. A TE norm keeps its input and 1/rms.
    """
    h, n = m.hidden, m.tokens / m.sp
    if m.impl == "local":
        own = (2 * FP32 * h + FP32) * n + (FP32 * h if m.act != FP32 else 0)
    else:
        own = (m.act * h + FP32) * n
    return own + output * h * n


def _norm_recomputed(m: Micro) -> float:
    """Megatron's layernorm recompute (CheckpointWithoutOutput): the input only; the output is
    dropped, also where the next layers keep it."""
    return m.act * m.hidden * m.tokens / m.sp


def input_norm(m: Micro) -> float:
    # TE fuses it into the QKV projection, which keeps the output for the weight gradient;
    # Megatron's layernorm recompute skips fused norms.
    if m.impl == "local" and m.recomputes("layernorm"):
        return _norm_recomputed(m)
    return _norm(m, m.gemm_input)


def pre_mlp_norm(m: Micro, moe: bool) -> float:
    if m.impl == "te" and not moe:  # fused into fc1
        return _norm_recomputed(m) if m.recomputes("mlp") else _norm(m, m.gemm_input)
    if m.recomputes("layernorm"):
        return _norm_recomputed(m)
    return _norm(m, _pre_mlp_output_kept(m, moe))


def _pre_mlp_output_kept(m: Micro, moe: bool) -> float:
    if not moe or m.recomputes("moe") or m.recomputes("mlp") and mlp_recompute_covers_moe():
        return m.act  # fc1 of the dense MLP, or the checkpoint of the MLP / MoE block
    # The router keeps it as it is (router_gating_linear: fp32 logits, no fp32 copy); under FP8
    # the shared experts' fc1 keeps an FP8 copy besides.
    fp8_copy = 1 if m.fp8 and m.shared and not m.recomputes("shared_experts") else 0
    return m.act + fp8_copy


def residual_dropout(m: Micro) -> float:
    """Bias-dropout-add masks (one byte per element) after attention and after the MLP."""
    return 2 * m.hidden * m.tokens / m.sp if m.hidden_dropout else 0.0


# ---------------------------------------------------------------------------------------------
# Attention


def attention(m: Micro) -> float:
    t, a, T = m.tp, m.act, m.tokens
    d, heads, groups = m.head_dim, m.heads // t, m.groups // t
    q, kv = heads * d, groups * d
    qkv = a * (q + 2 * kv) * T       # the projection's output: v stays a view of it
    rope = a * (q + kv) * T          # rotated q and k (new tensors)
    cos_sin = 4 * a * m.seq * d      # cos and sin, for q and for k: [seq, 1, 1, d] each
    scores = heads * m.batch * m.seq * m.seq
    context = a * q * T              # the o-projection's input
    if m.impl == "te":
        # flash attention keeps q, k, v, its output (the o-projection's input) and the fp32
        # log-sum-exp per head and position; with core_attn recompute the checkpoint keeps the
        # same q, k, v and the statistics go
        lse = 0 if m.recomputes("core_attn") else FP32 * heads * T
        fp8_copy = context / a if m.fp8 else 0  # the o-projection keeps its own FP8 copy
        return qkv + rope + cos_sin + lse + context + fp8_copy
    if m.recomputes("core_attn"):
        return qkv + rope + cos_sin + context  # the checkpoint keeps q, k and v
    # unfused: fp32 softmax probabilities and their cast, the causal mask; grouped-query
    # attention expands k and v to every head (new tensors) and lets the projection go
    probs = FP32 * scores + (a * scores if a != FP32 else 0) + m.seq * m.seq
    if m.attention_dropout:
        probs += scores + a * scores  # dropout mask and the dropped probabilities
    if heads > groups:
        qkv, rope = 0, a * q * T
        rope += 2 * a * q * T  # expanded k and v
    return qkv + rope + cos_sin + probs + context


# ---------------------------------------------------------------------------------------------
# MLPs


def swiglu_mlp(m: Micro, width: int) -> float:
    """Megatron's MLP (dense layers, shared experts): fc1's output (gate and up halves, kept by
    the activation), silu(gate), up + glu_linear_offset (a copy), and their product kept by fc2.
    The input, a norm output, is counted with the norm. A fused bias-SwiGLU keeps only fc1's
    output and fc2's input."""
    w, T, a = width / m.tp, m.tokens, m.act
    kept = 2 * a * w * T + m.gemm_input * w * T
    if not m.fused_swiglu:
        kept += 2 * a * w * T
    return kept


def shared_experts(m: Micro) -> float:
    if not m.shared or m.recomputes("shared_experts"):
        return 0.0
    return swiglu_mlp(m, m.shared)


def routed_tokens(m: Micro) -> float:
    """Tokens this GPU routes: its 1/TP share, or all T when the experts are TP-sharded."""
    return m.tokens if m.etp > 1 else m.tokens / m.tp


def router(m: Micro) -> float:
    """The softmax output, the top-k indices, and the per-sequence statistics of the balance
    losses (its input is counted with the pre-MLP norm's output)."""
    n, e = m.tokens / m.sp, m.experts
    balance = FP32 * (e + 1) * m.batch if m.balance_loss else 0
    return FP32 * e * n + INDEX * m.topk * n + balance


def routed_experts(m: Micro) -> float:
    """token_dispatcher.py and experts.py per routed copy (token x chosen expert): fc1's input
    (the permuted rows; its FP8 copy under FP8), fc1's output (kept by the weighted SwiGLU),
    the SwiGLU's output (fc2's input; dropped by moe_act recompute), the fp32 gate, and three
    index maps (the rows' gather, the gates' order and the inverse permutation); the per-expert
    counts. (An expert width per expert-TP rank that is not a multiple of 16 bytes makes
    torch._grouped_mm keep zero-padded copies: not counted.)"""
    a, h, w = m.act, m.hidden, m.expert_width / m.etp
    copies = routed_tokens(m) * m.topk
    stored = 1 if m.fp8 else a  # bytes per element a GEMM keeps of its input
    rows = stored * h * copies
    fc1 = 2 * a * w * copies
    act = 0 if m.recomputes("moe_act") else stored * w * copies
    counts = INDEX * m.experts // m.ep
    return rows + fc1 + act + (3 * INDEX + FP32) * copies + counts


def ep_dispatch(m: Micro) -> float:
    """Expert parallelism: the index regrouping the received rows by local expert and its
    inverse for the combine (none with one local expert); the all-to-alls keep nothing."""
    if m.ep == 1 or m.experts // m.ep == 1:
        return 0.0
    return 2 * INDEX * routed_tokens(m) * m.topk


def head_activations(m: Micro, vocab_rows: int) -> float:
    """The last pipeline stage: the final norm (its output kept by the output layer, a Megatron
    linear in every implementation) and the logits [T, vocab / TP], in the activation dtype and
    as the fp32 softmax Megatron's vocab-parallel cross entropy keeps."""
    return _norm(m, m.act) + (m.act + FP32) * m.tokens * vocab_rows / m.tp
