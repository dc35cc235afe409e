"""Megatron <-> Hugging Face (deepseek-moe-16b-base) mapping: tensor names, shapes and config
fields. Pure functions of tensors and configs; files are read and written by ``streaming.py``.
The tensor mappings return, per output name, a function computing it from ``get(input_name)``,
so a converter reads only what the tensors it is writing need.

Tensor mapping (H hidden, d head dim, g query groups = kv heads, q heads per group, F widths):

========================================================  ========================================
Megatron (single rank)                                    Hugging Face (model.layers.i. ...)
========================================================  ========================================
embedding.word_embeddings.weight [Vpad, H]                model.embed_tokens.weight [V, H]
decoder.layers.i.input_layernorm.weight                   input_layernorm.weight
decoder.layers.i.self_attention.linear_qkv.weight         self_attn.{q,k,v}_proj.weight; its rows
  [g * (q + 2) * d, H]                                    are [q heads of group j; k_j; v_j], j < g
decoder.layers.i.self_attention.linear_proj.weight        self_attn.o_proj.weight
decoder.layers.i.pre_mlp_layernorm.weight                 post_attention_layernorm.weight
decoder.layers.i.mlp.linear_fc1.weight [2F, H]            mlp.gate_proj (rows :F), up_proj (F:)
decoder.layers.i.mlp.linear_fc2.weight                    mlp.down_proj.weight
decoder.layers.i.mlp.router.weight [E, H]                 mlp.gate.weight
decoder.layers.i.mlp.experts.{gate,up,down}_proj [E,..]   mlp.experts.e.{gate,up,down}_proj.weight
decoder.layers.i.mlp.shared_experts.linear_fc1.weight     mlp.shared_experts.{gate,up}_proj.weight
decoder.layers.i.mlp.shared_experts.linear_fc2.weight     mlp.shared_experts.down_proj.weight
decoder.final_layernorm.weight                            model.norm.weight
output_layer.weight [Vpad, H]                             lm_head.weight [V, H]
========================================================  ========================================

Vocabulary: Megatron pads it (``model.padded_vocab_size``: a multiple of 1024, whatever the TP
size). config.json's ``vocab_size`` is the run's true vocabulary (``vocab_size`` in run.yaml, the
tokenizer's): the export keeps rows ``:V`` of the embedding and the output layer and drops the
padding rows, which no token id selects; the import pads with zero rows again. Logits agree on every
real token id. Transformer Engine's fused-norm names (``linear_qkv.layer_norm_weight``...) are
read as the norms they are.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


class ConversionError(RuntimeError):
    """A checkpoint or configuration the converter cannot map; the message names what and why."""


def log(msg: str) -> None:
    print(f"[dsmoe-convert] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Shapes and names
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes both sides agree on; everything the tensor mapping needs."""

    num_layers: int
    hidden: int
    heads: int
    groups: int  # key/value heads (Megatron's num_query_groups)
    head_dim: int
    ffn: int
    vocab: int
    moe_layers: tuple[bool, ...]
    experts: int = 0
    expert_width: int = 0
    shared: int = 0  # number of shared experts

    @classmethod
    def from_megatron(cls, cfg, vocab_size: int) -> Dims:
        return cls(
            num_layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
            groups=cfg.num_query_groups or cfg.num_attention_heads, head_dim=cfg.kv_channels,
            ffn=cfg.ffn_hidden_size, vocab=vocab_size,
            moe_layers=tuple(cfg.moe_layer_pattern()),
            experts=cfg.num_moe_experts or 0, expert_width=cfg.moe_ffn_hidden_size or 0,
            shared=cfg.moe_num_shared_experts or 0,
        )


def hf_expected_shapes(dims: Dims) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DeepseekForCausalLM with these sizes, in file order."""
    h, d = dims.hidden, dims.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (dims.vocab, h)}
    for i, moe in enumerate(dims.moe_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (dims.heads * d, h)
        shapes[p + "self_attn.k_proj.weight"] = (dims.groups * d, h)
        shapes[p + "self_attn.v_proj.weight"] = (dims.groups * d, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, dims.heads * d)
        if moe:
            w = dims.expert_width
            shapes[p + "mlp.gate.weight"] = (dims.experts, h)
            for e in range(dims.experts):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (w, h)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (w, h)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (h, w)
            if dims.shared:
                s = dims.shared * w
                shapes[p + "mlp.shared_experts.gate_proj.weight"] = (s, h)
                shapes[p + "mlp.shared_experts.up_proj.weight"] = (s, h)
                shapes[p + "mlp.shared_experts.down_proj.weight"] = (h, s)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (dims.ffn, h)
            shapes[p + "mlp.up_proj.weight"] = (dims.ffn, h)
            shapes[p + "mlp.down_proj.weight"] = (h, dims.ffn)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (dims.vocab, h)
    return shapes


# Buffers some exporters write that carry no weights (recomputed from the config).
IGNORED_HF_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")

# Transformer Engine fuses the norms into the following linear layer; same weights.
_TE_RENAMES = (
    (re.compile(r"^(decoder\.layers\.\d+\.)self_attention\.linear_qkv\.layer_norm_weight$"),
     r"\1input_layernorm.weight"),
    (re.compile(r"^(decoder\.layers\.\d+\.)mlp\.linear_fc1\.layer_norm_weight$"),
     r"\1pre_mlp_layernorm.weight"),
)


def canonical_name(name: str) -> str:
    """The local-spec name of a tensor (TE's fused-norm names, which the checkpoint keys use, mapped
    back to the norms they are)."""
    for pattern, repl in _TE_RENAMES:
        name = pattern.sub(repl, name)
    return name


def normalise_megatron_names(state: Mapping) -> dict[str, torch.Tensor]:
    """Tensors only (no ``_extra_state``), under their local-spec names."""
    return {canonical_name(name): value for name, value in state.items()
            if isinstance(value, torch.Tensor) and not name.endswith("_extra_state")}


def _qkv_split(qkv: torch.Tensor, dims: Dims):
    per_group = dims.heads // dims.groups
    w = qkv.view(dims.groups, per_group + 2, dims.head_dim, -1)
    hidden = w.shape[-1]
    q = w[:, :per_group].reshape(dims.heads * dims.head_dim, hidden)
    k = w[:, per_group].reshape(dims.groups * dims.head_dim, hidden)
    v = w[:, per_group + 1].reshape(dims.groups * dims.head_dim, hidden)
    return q, k, v


def _qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: Dims) -> torch.Tensor:
    per_group, d = dims.heads // dims.groups, dims.head_dim
    hidden = q.shape[-1]
    fused = torch.cat([q.reshape(dims.groups, per_group, d, hidden),
                       k.reshape(dims.groups, 1, d, hidden),
                       v.reshape(dims.groups, 1, d, hidden)], dim=1)
    return fused.reshape(dims.groups * (per_group + 2) * d, hidden)


Source = Callable[[], torch.Tensor]
"""A tensor computed when called: the mappings read their inputs only when an output is needed."""


def megatron_to_hf(get: Callable[[str], torch.Tensor], dims: Dims) -> dict[str, Source]:
    """DeepseekForCausalLM tensor name -> its value from ``get(megatron_name)`` (single-rank,
    local-spec names), in Hugging Face file order. Several outputs slice one Megatron tensor
    (q/k/v, experts), so ``get`` should keep the layer it last read."""
    def part(name: str, index: int | slice | None = None) -> Source:
        return lambda: get(name) if index is None else get(name)[index]

    def qkv(name: str, which: int) -> Source:
        return lambda: _qkv_split(get(name), dims)[which]

    vocab = slice(0, dims.vocab)  # the padding rows are dropped
    out: dict[str, Source] = {"model.embed_tokens.weight": part("embedding.word_embeddings.weight",
                                                               vocab)}
    for i, moe in enumerate(dims.moe_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        for which, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[p + f"self_attn.{name}.weight"] = qkv(m + "self_attention.linear_qkv.weight", which)
        out[p + "self_attn.o_proj.weight"] = part(m + "self_attention.linear_proj.weight")
        if moe:
            out[p + "mlp.gate.weight"] = part(m + "mlp.router.weight")
            for e in range(dims.experts):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    out[p + f"mlp.experts.{e}.{name}.weight"] = part(m + f"mlp.experts.{name}", e)
            if dims.shared:
                s = dims.shared * dims.expert_width
                fc1 = m + "mlp.shared_experts.linear_fc1.weight"
                out[p + "mlp.shared_experts.gate_proj.weight"] = part(fc1, slice(0, s))
                out[p + "mlp.shared_experts.up_proj.weight"] = part(fc1, slice(s, None))
                out[p + "mlp.shared_experts.down_proj.weight"] = part(
                    m + "mlp.shared_experts.linear_fc2.weight")
        else:
            fc1 = m + "mlp.linear_fc1.weight"
            out[p + "mlp.gate_proj.weight"] = part(fc1, slice(0, dims.ffn))
            out[p + "mlp.up_proj.weight"] = part(fc1, slice(dims.ffn, None))
            out[p + "mlp.down_proj.weight"] = part(m + "mlp.linear_fc2.weight")
        out[p + "input_layernorm.weight"] = part(m + "input_layernorm.weight")
        out[p + "post_attention_layernorm.weight"] = part(m + "pre_mlp_layernorm.weight")
    out["model.norm.weight"] = part("decoder.final_layernorm.weight")
    out["lm_head.weight"] = part("output_layer.weight", vocab)
    return out


def check_megatron_tensors(shapes: Mapping[str, Sequence[int]], dims: Dims) -> None:
    """A checkpoint's tensors (local-spec name -> shape) against those of the model ``dims``
    describes (its run config's): missing, unused and mis-shaped tensors raise ConversionError
    with both shapes, before any data is read (the mapping runs on meta tensors)."""
    padded = tuple(shapes.get("embedding.word_embeddings.weight", (dims.vocab,)))[0]
    hf = {n: torch.empty(s, device="meta") for n, s in hf_expected_shapes(dims).items()}
    expected = {n: tuple(make().shape)
                for n, make in hf_to_megatron(hf.__getitem__, dims, padded).items()}
    check_shapes(shapes, expected, "the checkpoint's", shape_of=tuple)


def hf_to_megatron(get: Callable[[str], torch.Tensor], dims: Dims, padded_vocab: int
                   ) -> dict[str, Source]:
    """Single-rank GPTModel tensor name (local spec) -> its value from ``get(hf_name)``; the
    vocabulary padding rows are zero."""

    def padded(name: str) -> Source:
        def make() -> torch.Tensor:
            t = get(name)
            if t.shape[0] == padded_vocab:
                return t
            return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], t.shape[1])])
        return make

    def one(name: str) -> Source:
        return lambda: get(name)

    def cat(*names: str) -> Source:
        return lambda: torch.cat([get(n) for n in names])

    def stack(names: Sequence[str]) -> Source:
        return lambda: torch.stack([get(n) for n in names])

    def qkv(prefix: str) -> Source:
        q, k, v = (prefix + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj"))
        return lambda: _qkv_merge(get(q), get(k), get(v), dims)

    out: dict[str, Source] = {
        "embedding.word_embeddings.weight": padded("model.embed_tokens.weight")}
    for i, moe in enumerate(dims.moe_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[m + "input_layernorm.weight"] = one(p + "input_layernorm.weight")
        out[m + "self_attention.linear_qkv.weight"] = qkv(p)
        out[m + "self_attention.linear_proj.weight"] = one(p + "self_attn.o_proj.weight")
        out[m + "pre_mlp_layernorm.weight"] = one(p + "post_attention_layernorm.weight")
        if moe:
            out[m + "mlp.router.weight"] = one(p + "mlp.gate.weight")
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[m + f"mlp.experts.{name}"] = stack(
                    [p + f"mlp.experts.{e}.{name}.weight" for e in range(dims.experts)])
            if dims.shared:
                out[m + "mlp.shared_experts.linear_fc1.weight"] = cat(
                    p + "mlp.shared_experts.gate_proj.weight",
                    p + "mlp.shared_experts.up_proj.weight")
                out[m + "mlp.shared_experts.linear_fc2.weight"] = one(
                    p + "mlp.shared_experts.down_proj.weight")
        else:
            out[m + "mlp.linear_fc1.weight"] = cat(p + "mlp.gate_proj.weight",
                                                   p + "mlp.up_proj.weight")
            out[m + "mlp.linear_fc2.weight"] = one(p + "mlp.down_proj.weight")
    out["decoder.final_layernorm.weight"] = one("model.norm.weight")
    out["output_layer.weight"] = padded("lm_head.weight")
    return out


def check_shapes(tensors: Mapping[str, Sequence[int]], expected: Mapping[str, tuple], what: str,
                  shape_of=lambda t: tuple(t.shape)) -> None:
    """Missing, unexpected and mis-shaped tensors, each named, in one error."""
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected]
    wrong = [f"{n}: {tuple(shape_of(tensors[n]))}, expected {expected[n]}"
             for n in expected if n in tensors and tuple(shape_of(tensors[n])) != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}"
                        f"{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensors ({len(extra)}): {', '.join(extra[:8])}"
                        f"{' ...' if len(extra) > 8 else ''}")
    if wrong:
        problems.append(f"shape mismatch ({len(wrong)}): {'; '.join(wrong[:8])}"
                        f"{' ...' if len(wrong) > 8 else ''}")
    if problems:
        raise ConversionError(f"{what} tensors do not match the config: " + " | ".join(problems))


# ------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------

def _unsupported(field: str, value, why: str) -> ConversionError:
    return ConversionError(f"unsupported config: {field}={value!r}: {why}")


def check_exportable(cfg) -> None:
    """Megatron features the Hugging Face DeepSeekMoE model does not have."""
    import torch.nn.functional as F

    checks = [
        ("normalization", cfg.normalization, cfg.normalization == "RMSNorm", "needs RMSNorm"),
        ("gated_linear_unit", cfg.gated_linear_unit, cfg.gated_linear_unit, "needs SwiGLU"),
        ("activation_func", getattr(cfg.activation_func, "__name__", cfg.activation_func),
         cfg.activation_func is F.silu, "needs silu (SwiGLU)"),
        ("add_bias_linear", cfg.add_bias_linear, not cfg.add_bias_linear, "no biases in HF"),
        ("add_qkv_bias", cfg.add_qkv_bias, not cfg.add_qkv_bias, "no biases in HF"),
        ("qk_layernorm", cfg.qk_layernorm, not cfg.qk_layernorm, "no qk-norm in HF"),
        ("kv_channels", cfg.kv_channels, cfg.kv_channels * cfg.num_attention_heads ==
         cfg.hidden_size, "HF's head dim is hidden_size / num_attention_heads"),
        ("rotary_interleaved", cfg.rotary_interleaved, not cfg.rotary_interleaved,
         "HF uses the half-split rotary embedding"),
        ("rotary_percent", getattr(cfg, "rotary_percent", 1.0),
         getattr(cfg, "rotary_percent", 1.0) == 1.0, "HF rotates the whole head"),
        ("softmax_type", cfg.softmax_type, cfg.softmax_type == "vanilla", "HF has plain softmax"),
        ("softmax_scale", cfg.softmax_scale, cfg.softmax_scale is None or math.isclose(
            cfg.softmax_scale, cfg.kv_channels ** -0.5), "HF scales by 1/sqrt(head_dim)"),
        ("layernorm_zero_centered_gamma", cfg.layernorm_zero_centered_gamma,
         not cfg.layernorm_zero_centered_gamma, "HF norms multiply by the weight"),
        ("apply_residual_connection_post_layernorm",
         cfg.apply_residual_connection_post_layernorm,
         not cfg.apply_residual_connection_post_layernorm, "HF is pre-norm"),
        ("glu_linear_offset", cfg.glu_linear_offset, not cfg.glu_linear_offset,
         "HF's SwiGLU is silu(gate) * up"),
        ("activation_func_clamp_value", cfg.activation_func_clamp_value,
         cfg.activation_func_clamp_value is None, "HF's SwiGLU is unclamped"),
        ("window_size", cfg.window_size, cfg.window_size is None,
         "HF attends to every earlier token"),
        ("no_rope_freq", cfg.no_rope_freq, not cfg.no_rope_freq, "HF rotates in every layer"),
        ("qk_l2_norm", cfg.qk_l2_norm, not cfg.qk_l2_norm, "no qk-norm in HF"),
        ("attention_output_gate", cfg.attention_output_gate, not cfg.attention_output_gate,
         "HF's attention has no output gate"),
        ("multi_latent_attention", cfg.multi_latent_attention,
         not cfg.multi_latent_attention, "HF's deepseek model has multi-head attention"),
        ("experimental_attention_variant", cfg.experimental_attention_variant,
         cfg.experimental_attention_variant is None, "HF has softmax attention"),
        ("use_mup", cfg.use_mup, not cfg.use_mup, "HF has no muP multipliers"),
    ]
    # Router settings HF lacks (gate scaling, expert bias, group-limited routing) are refused by
    # DeepSeekMoEConfig itself: the block does not implement them either.
    for field, value, ok, why in checks:
        if not ok:
            raise _unsupported(field, value, why)
    if cfg.num_moe_experts:
        _hf_moe_layout(cfg)


def _hf_moe_layout(cfg) -> tuple[int, int]:
    """(first_k_dense_replace, moe_layer_freq): HF places MoE layers at i >= first_k_dense_replace
    with i % moe_layer_freq == 0. A pattern set by a moe_layer_freq list ([0, 1, 1, 1]) is
    written as the pair that gives it (1, 1)."""
    pattern, n = cfg.moe_layer_pattern(), cfg.num_layers
    for first in (cfg.moe_first_k_dense, *range(n + 1)):
        for freq in range(1, n + 1):
            if pattern == [i >= first and i % freq == 0 for i in range(n)]:
                return first, freq
    raise _unsupported("moe_layer_freq", cfg.moe_layer_freq,
                       "the MoE layer pattern cannot be written as HF's first_k_dense_replace + "
                       "moe_layer_freq")


def hf_config_dict(cfg, vocab_size: int, max_position_embeddings: int, dtype: torch.dtype,
                   bos_token_id: int | None = None, eos_token_id: int | None = None,
                   pad_token_id: int | None = None) -> dict:
    """config.json for DeepseekForCausalLM with every field written out."""
    check_exportable(cfg)
    moe = bool(cfg.num_moe_experts)
    first_and_freq = _hf_moe_layout(cfg) if moe else (0, 1)
    coeff = cfg.moe_aux_loss_coeff
    if isinstance(coeff, (list, tuple)):
        coeff = coeff[0] if coeff else 0.0
    if cfg.moe_router_load_balancing_type == "none":  # the router applies no balance loss
        coeff = 0.0
    config = {
        "architectures": ["DeepseekForCausalLM"],
        "model_type": "deepseek",
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size if moe else None,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups or cfg.num_attention_heads,
        "n_shared_experts": cfg.moe_num_shared_experts if moe else None,
        "n_routed_experts": cfg.num_moe_experts if moe else None,
        "num_experts_per_tok": cfg.moe_router_topk if moe else None,
        "moe_layer_freq": first_and_freq[1],
        "first_k_dense_replace": first_and_freq[0],
        "norm_topk_prob": (not cfg.moe_router_pre_softmax) if moe else False,
        "scoring_func": "softmax",
        "aux_loss_alpha": float(coeff or 0.0),
        "seq_aux": cfg.moe_router_load_balancing_type == "seq_aux_loss",
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": cfg.init_method_std,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "use_cache": True,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "rope_theta": float(cfg.rotary_base),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": cfg.attention_dropout,
        "torch_dtype": DTYPE_NAMES[dtype],
    }
    try:
        import transformers

        config["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    return config


def hf_defaults() -> dict:
    """Values our HF configuration class uses for fields a config.json leaves out."""
    names = ("moe_layer_freq", "first_k_dense_replace", "norm_topk_prob", "scoring_func",
             "aux_loss_alpha", "seq_aux", "hidden_act", "max_position_embeddings",
             "initializer_range", "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias",
             "attention_dropout", "tie_word_embeddings", "n_shared_experts", "n_routed_experts",
             "num_experts_per_tok", "moe_intermediate_size", "intermediate_size")
    try:
        from dsmoe_megatron.hf.configuration_deepseek import DeepseekConfig
    except ImportError:  # transformers missing: the released code's defaults for the few we need
        return dict(moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False,
                    scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu",
                    max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-6,
                    rope_theta=10000.0, rope_scaling=None, attention_bias=False,
                    attention_dropout=0.0, tie_word_embeddings=False)
    return {n: getattr(DeepseekConfig, n) for n in names if hasattr(DeepseekConfig, n)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


# What a config.json field must hold: (description, test).
_HF_KINDS = {
    "size": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "count": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "integer": ("an integer", _is_int),
    "number": ("a number", _is_number),
    "positive": ("a positive number", lambda v: _is_number(v) and v > 0),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "string": ("a string", lambda v: isinstance(v, str)),
    "object": ("a JSON object", lambda v: isinstance(v, dict)),
    "token ids": ("a token id (an integer >= 0) or a list of them",
                  lambda v: (_is_int(v) and v >= 0) or (isinstance(v, list) and v and all(
                      _is_int(i) and i >= 0 for i in v))),
}
# field: (kind, null allowed)
_HF_FIELDS = {
    "vocab_size": ("size", False), "hidden_size": ("size", False),
    "intermediate_size": ("size", False), "num_hidden_layers": ("size", False),
    "num_attention_heads": ("size", False), "num_key_value_heads": ("size", True),
    "head_dim": ("size", True), "max_position_embeddings": ("size", False),
    "moe_intermediate_size": ("size", True), "n_routed_experts": ("count", True),
    "n_shared_experts": ("count", True), "num_experts_per_tok": ("size", True),
    "first_k_dense_replace": ("count", False), "moe_layer_freq": ("integer", False),
    "pretraining_tp": ("size", True), "rms_norm_eps": ("positive", False),
    "rope_theta": ("positive", False), "initializer_range": ("number", False),
    "aux_loss_alpha": ("number", False), "attention_dropout": ("number", True),
    "norm_topk_prob": ("bool", False), "seq_aux": ("bool", False),
    "attention_bias": ("bool", False), "tie_word_embeddings": ("bool", False),
    "scoring_func": ("string", False), "hidden_act": ("string", False),
    "topk_method": ("string", True), "routed_scaling_factor": ("number", True),
    "model_type": ("string", True), "rope_scaling": ("object", True),
    "rope_parameters": ("object", True), "bos_token_id": ("token ids", True),
    "eos_token_id": ("token ids", True), "pad_token_id": ("token ids", True),
}


def json_type(value) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"),
                       (float, "a number"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def check_hf_config(hf, where: str = "config.json") -> None:
    """The fields of a config.json this converter reads hold values of the right type (a JSON
    object at the top, positive integer sizes, booleans, ...); ConversionError names the first
    field that does not."""
    if not isinstance(hf, dict):
        raise ConversionError(f"{where} must hold a JSON object of model settings "
                              f"(\"hidden_size\": 2048, ...), not {json_type(hf)}; fix the file")
    for field, (kind, nullable) in _HF_FIELDS.items():
        if field not in hf or (nullable and hf[field] is None):
            continue
        description, ok = _HF_KINDS[kind]
        if not ok(hf[field]):
            raise ConversionError(
                f"{where}: {field} must be {description}{' or null' if nullable else ''}, got "
                f"{hf[field]!r} ({json_type(hf[field])}); fix the file")


def _no_op_rope_scaling(scaling: Mapping) -> bool:
    """Linear scaling by 1, which divides the positions by 1 (any other kind or factor changes
    the rotary angles)."""
    factor = scaling.get("factor")
    return (scaling.get("type", scaling.get("rope_type")) == "linear" and _is_number(factor)
            and factor == 1)


def model_fields_from_hf(hf: Mapping, where: str = "config.json") -> dict:
    """config.json of a DeepSeekMoE model -> DeepSeekMoEConfig fields (beyond deepseek_defaults).

    Raises ConversionError for what the Megatron model cannot represent, naming ``where`` (the
    file's path, which a user with several model directories needs).
    """
    def unsupported(field: str, value, why: str) -> ConversionError:
        return ConversionError(f"{where}: {_unsupported(field, value, why)}")

    rope = hf.get("rope_parameters") if isinstance(hf, Mapping) else None
    if isinstance(rope, Mapping) and "rope_theta" in rope:  # a config.json in transformers 5's style
        if hf.get("rope_theta") not in (None, rope["rope_theta"]):
            raise ConversionError(
                f"{where} sets rope_theta={hf['rope_theta']!r} and rope_parameters.rope_theta="
                f"{rope['rope_theta']!r}, two RoPE bases; keep the one the model was trained with")
        hf = {**hf, "rope_theta": rope["rope_theta"]}
    check_hf_config(hf, where)
    c = {**hf_defaults(), **{k: v for k, v in hf.items()}}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "intermediate_size"):
        if c.get(key) is None:
            raise ConversionError(f"{where} has no {key!r}")
    model_type = hf.get("model_type")
    if model_type not in (None, "deepseek"):
        raise unsupported("model_type", model_type,
                          "only DeepSeekMoE ('deepseek', deepseek-moe-16b layout) is supported")
    if c["scoring_func"] != "softmax":
        raise unsupported("scoring_func", c["scoring_func"], "only 'softmax' routing is supported")
    # Routing fields of later DeepSeek models (V2, V3), which the deepseek code ignores.
    if c.get("topk_method") not in (None, "greedy"):
        raise unsupported("topk_method", c["topk_method"],
                          "only plain top-k routing ('greedy') is supported")
    if c.get("routed_scaling_factor") not in (None, 1):
        raise unsupported("routed_scaling_factor", c["routed_scaling_factor"],
                          "the routed experts' output is not scaled (only 1 is supported)")
    if c["hidden_act"] != "silu":
        raise unsupported("hidden_act", c["hidden_act"], "only SwiGLU (silu) is supported")
    if c["attention_bias"]:
        raise unsupported("attention_bias", True, "the Megatron model has no attention biases")
    if c["rope_scaling"] and not _no_op_rope_scaling(c["rope_scaling"]):
        raise unsupported("rope_scaling", c["rope_scaling"], "RoPE scaling is not supported")
    rope = c.get("rope_parameters")
    if rope and rope.get("rope_type", "default") != "default" and not _no_op_rope_scaling(rope):
        raise unsupported("rope_parameters", rope, "RoPE scaling is not supported")
    if c["tie_word_embeddings"]:
        raise unsupported("tie_word_embeddings", True, "the Megatron model has untied embeddings")
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    if hidden % heads:
        raise unsupported("num_attention_heads", heads, f"does not divide hidden_size={hidden}")
    if c.get("head_dim") not in (None, hidden // heads):
        raise unsupported("head_dim", c["head_dim"], "must be hidden_size / num_attention_heads")
    kv = c.get("num_key_value_heads") or heads
    if heads % kv:
        raise unsupported("num_key_value_heads", kv,
                          f"must divide num_attention_heads={heads}")
    fields = dict(
        num_layers=c["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv,
        ffn_hidden_size=c["intermediate_size"],
        layernorm_epsilon=float(c["rms_norm_eps"]),
        init_method_std=float(c["initializer_range"]),
        attention_dropout=float(c["attention_dropout"] or 0.0),
        rotary_base=float(c["rope_theta"]),
    )
    if c.get("n_routed_experts"):
        freq = c["moe_layer_freq"]
        if not isinstance(freq, int) or freq < 1:
            raise unsupported("moe_layer_freq", freq, "must be a positive integer")
        if not c.get("num_experts_per_tok") or not c.get("moe_intermediate_size"):
            raise ConversionError(f"{where} sets n_routed_experts but not "
                                  "num_experts_per_tok / moe_intermediate_size")
        fields.update(
            num_moe_experts=c["n_routed_experts"],
            moe_router_topk=c["num_experts_per_tok"],
            moe_ffn_hidden_size=c["moe_intermediate_size"],
            moe_num_shared_experts=c.get("n_shared_experts") or 0,
            # HF takes any count (beyond the last layer: every layer dense); Megatron at most
            # num_layers, which gives the same layers.
            moe_first_k_dense=min(c["first_k_dense_replace"], c["num_hidden_layers"]),
            moe_layer_freq=freq,
            # The released code renormalises the top-k weights only for top_k > 1.
            moe_router_pre_softmax=not c["norm_topk_prob"] or c["num_experts_per_tok"] == 1,
            moe_aux_loss_coeff=float(c["aux_loss_alpha"]),
            moe_router_load_balancing_type="seq_aux_loss" if c["seq_aux"] else "aux_loss",
        )
    return fields


def hf_dims(hf: Mapping) -> Dims:
    """Sizes of the HF model that config.json describes (after model_fields_from_hf's checks)."""
    c = {**hf_defaults(), **hf}
    n = c["num_hidden_layers"]
    moe = bool(c.get("n_routed_experts"))
    first, freq = c["first_k_dense_replace"], c["moe_layer_freq"]
    return Dims(
        num_layers=n, hidden=c["hidden_size"], heads=c["num_attention_heads"],
        groups=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c["hidden_size"] // c["num_attention_heads"], ffn=c["intermediate_size"],
        vocab=c["vocab_size"],
        moe_layers=tuple(moe and i >= first and i % freq == 0 for i in range(n)),
        experts=c.get("n_routed_experts") or 0, expert_width=c.get("moe_intermediate_size") or 0,
        shared=(c.get("n_shared_experts") or 0) if moe else 0,
    )


def single_rank_config(cfg, params_dtype: torch.dtype | None = None):
    """The same model on one rank (TP = PP = EP = 1, no SP / recompute / FP8), for conversion."""
    from dsmoe_megatron.config import replace

    changes = dict(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        expert_tensor_parallel_size=None, context_parallel_size=1, sequence_parallel=False,
        num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
        pipeline_model_parallel_layout=None, account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False, pipeline_dtype=None,
        recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
        recompute_modules=None,
        fp8=None, fp8_param=False, fp4=None, fp4_param=False,
        # Torch experts whatever the machine: the converter never runs Transformer Engine.
        moe_expert_backend="sequential", overlap_moe_expert_parallel_comm=False,
        cpu_offloading=False, enable_cuda_graph=False, cuda_graph_impl="none",
        use_cpu_initialization=True, perform_initialization=False,
        # Keep the device-level balance groups (they default to the EP size).
        moe_device_groups=cfg.num_device_groups() if cfg.num_moe_experts else None,
    )
    if params_dtype is not None:
        changes.update(params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
                       fp16=params_dtype == torch.float16)
    fields = {f.name for f in dataclasses.fields(cfg)}
    return replace(cfg, **{k: v for k, v in changes.items() if k in fields})
