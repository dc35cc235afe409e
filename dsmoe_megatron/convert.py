"""Megatron dist checkpoint <-> Hugging Face (deepseek-moe-16b-base layout) conversion.

    dsmoe-convert to-hf   --checkpoint SAVE_OR_ITER_DIR --out HF_DIR [--dtype auto|bf16|fp16|fp32]
    dsmoe-convert from-hf --hf HF_DIR --out SAVE_DIR [--tensor-model-parallel-size N ...]

to-hf loads a checkpoint saved under any TP/PP/EP layout into a single-rank model (dist-checkpoint
keys are layout independent), builds it from the checkpoint's run.yaml, and writes config.json
(every field explicit), generation_config.json, sharded safetensors + index, the remote-code
files and the tokenizer files (see ``choose_tokenizer``). from-hf reads config.json and the
safetensors (never pickles), and writes a save directory: an iteration-0 dist checkpoint with its
run.yaml, which the trainer loads. Both write ``<out>.partial`` and rename it when complete.

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

Vocabulary: Megatron pads it (``model.padded_vocab_size``, a multiple of 1024, whatever the TP size). config.json's
``vocab_size`` is the run's true vocabulary (``vocab_size`` in run.yaml, the tokenizer's): the
export keeps rows ``:V`` of the embedding and the output layer and drops the padding rows, which
no token id selects; the import pads with zero rows for the run's TP size. Logits agree on every
real token id. Transformer Engine's fused-norm names (``linear_qkv.layer_norm_weight``...) are
read as the norms they are.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
ROPE_THETA = 10000.0  # model.build_model's rotary_base
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")


class ConversionError(RuntimeError):
    """A checkpoint or configuration the converter cannot map; the message names what and why."""


def _log(msg: str) -> None:
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
_IGNORED_HF_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")

# Transformer Engine fuses the norms into the following linear layer; same weights.
_TE_RENAMES = (
    (re.compile(r"^(decoder\.layers\.\d+\.)self_attention\.linear_qkv\.layer_norm_weight$"),
     r"\1input_layernorm.weight"),
    (re.compile(r"^(decoder\.layers\.\d+\.)mlp\.linear_fc1\.layer_norm_weight$"),
     r"\1pre_mlp_layernorm.weight"),
)


def _canonical_name(name: str) -> str:
    """The local-spec name of a state-dict entry (TE's fused-norm names mapped back)."""
    for pattern, repl in _TE_RENAMES:
        name = pattern.sub(repl, name)
    return name


def _normalise_megatron_names(state: Mapping) -> dict[str, torch.Tensor]:
    """Tensors only (no ``_extra_state``), under their local-spec names."""
    return {_canonical_name(name): value for name, value in state.items()
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


def megatron_to_hf(state: Mapping, dims: Dims) -> dict[str, torch.Tensor]:
    """A single-rank GPTModel state dict -> DeepseekForCausalLM tensors (views; not copied)."""
    src = _normalise_megatron_names(state)
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise ConversionError(f"the checkpoint has no tensor {name!r}")
        used.add(name)
        return src[name]

    out: dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")[: dims.vocab]
    for i, moe in enumerate(dims.moe_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = _qkv_split(take(m + "self_attention.linear_qkv.weight"), dims)
        out[p + "self_attn.q_proj.weight"] = q
        out[p + "self_attn.k_proj.weight"] = k
        out[p + "self_attn.v_proj.weight"] = v
        out[p + "self_attn.o_proj.weight"] = take(m + "self_attention.linear_proj.weight")
        if moe:
            out[p + "mlp.gate.weight"] = take(m + "mlp.router.weight")
            gate, up, down = (take(m + f"mlp.experts.{n}") for n in ("gate_proj", "up_proj",
                                                                      "down_proj"))
            for e in range(dims.experts):
                out[p + f"mlp.experts.{e}.gate_proj.weight"] = gate[e]
                out[p + f"mlp.experts.{e}.up_proj.weight"] = up[e]
                out[p + f"mlp.experts.{e}.down_proj.weight"] = down[e]
            if dims.shared:
                fc1 = take(m + "mlp.shared_experts.linear_fc1.weight")
                s = dims.shared * dims.expert_width
                out[p + "mlp.shared_experts.gate_proj.weight"] = fc1[:s]
                out[p + "mlp.shared_experts.up_proj.weight"] = fc1[s:]
                out[p + "mlp.shared_experts.down_proj.weight"] = take(
                    m + "mlp.shared_experts.linear_fc2.weight")
        else:
            fc1 = take(m + "mlp.linear_fc1.weight")
            out[p + "mlp.gate_proj.weight"] = fc1[: dims.ffn]
            out[p + "mlp.up_proj.weight"] = fc1[dims.ffn:]
            out[p + "mlp.down_proj.weight"] = take(m + "mlp.linear_fc2.weight")
        out[p + "input_layernorm.weight"] = take(m + "input_layernorm.weight")
        out[p + "post_attention_layernorm.weight"] = take(m + "pre_mlp_layernorm.weight")
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    out["lm_head.weight"] = take("output_layer.weight")[: dims.vocab]
    extra = sorted(set(src) - used)
    if extra:
        raise ConversionError(
            f"the checkpoint has tensors the Hugging Face model has no place for: {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''} (biases, qk-norm and similar are not supported)"
        )
    _check_shapes(out, hf_expected_shapes(dims), "exported")
    return out


def iter_hf_to_megatron(get, dims: Dims, padded_vocab: int
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """``get(hf_name) -> tensor`` -> (name, tensor) of a single-rank GPTModel state dict, one
    at a time (vocabulary padding rows are zero)."""

    def padded(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == padded_vocab:
            return t
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], t.shape[1])])

    yield "embedding.word_embeddings.weight", padded(get("model.embed_tokens.weight"))
    for i, moe in enumerate(dims.moe_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        yield m + "input_layernorm.weight", get(p + "input_layernorm.weight")
        yield m + "self_attention.linear_qkv.weight", _qkv_merge(
            get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
            get(p + "self_attn.v_proj.weight"), dims)
        yield m + "self_attention.linear_proj.weight", get(p + "self_attn.o_proj.weight")
        yield m + "pre_mlp_layernorm.weight", get(p + "post_attention_layernorm.weight")
        if moe:
            yield m + "mlp.router.weight", get(p + "mlp.gate.weight")
            for name in ("gate_proj", "up_proj", "down_proj"):
                yield m + f"mlp.experts.{name}", torch.stack(
                    [get(p + f"mlp.experts.{e}.{name}.weight") for e in range(dims.experts)])
            if dims.shared:
                yield m + "mlp.shared_experts.linear_fc1.weight", torch.cat(
                    [get(p + "mlp.shared_experts.gate_proj.weight"),
                     get(p + "mlp.shared_experts.up_proj.weight")])
                yield m + "mlp.shared_experts.linear_fc2.weight", get(
                    p + "mlp.shared_experts.down_proj.weight")
        else:
            yield m + "mlp.linear_fc1.weight", torch.cat(
                [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
            yield m + "mlp.linear_fc2.weight", get(p + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    yield "output_layer.weight", padded(get("lm_head.weight"))


def hf_to_megatron(get, dims: Dims, padded_vocab: int) -> dict[str, torch.Tensor]:
    """``get(hf_name) -> tensor`` -> single-rank GPTModel state dict (padding rows zero)."""
    return dict(iter_hf_to_megatron(get, dims, padded_vocab))


def _check_shapes(tensors: Mapping[str, Sequence[int]], expected: Mapping[str, tuple], what: str,
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
    ]
    if cfg.num_moe_experts:
        checks += [
            ("moe_router_topk_scaling_factor", cfg.moe_router_topk_scaling_factor,
             not cfg.moe_router_topk_scaling_factor, "HF does not scale the gates"),
            ("moe_router_enable_expert_bias", cfg.moe_router_enable_expert_bias,
             not cfg.moe_router_enable_expert_bias, "HF routers have no expert bias"),
            ("moe_router_num_groups", cfg.moe_router_num_groups, not cfg.moe_router_num_groups,
             "HF has no group-limited routing"),
        ]
    for field, value, ok, why in checks:
        if not ok:
            raise _unsupported(field, value, why)
    if cfg.num_moe_experts:
        _hf_moe_layer_freq(cfg)


def _hf_moe_layer_freq(cfg) -> int:
    """HF places MoE layers at i >= first_k_dense_replace with i % moe_layer_freq == 0."""
    pattern = cfg.moe_layer_pattern()
    for freq in range(1, cfg.num_layers + 1):
        if pattern == [i >= cfg.moe_first_k_dense and i % freq == 0
                       for i in range(cfg.num_layers)]:
            return freq
    raise _unsupported("moe_layer_freq", cfg.moe_layer_freq,
                       "the MoE layer pattern cannot be written as HF's first_k_dense_replace + "
                       "moe_layer_freq")


def hf_config_dict(cfg, vocab_size: int, max_position_embeddings: int, dtype: torch.dtype,
                   bos_token_id: int | None = None, eos_token_id: int | None = None,
                   pad_token_id: int | None = None) -> dict:
    """config.json for DeepseekForCausalLM with every field written out."""
    check_exportable(cfg)
    moe = bool(cfg.num_moe_experts)
    coeff = cfg.moe_aux_loss_coeff
    if isinstance(coeff, (list, tuple)):
        coeff = coeff[0] if coeff else 0.0
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
        "moe_layer_freq": _hf_moe_layer_freq(cfg) if moe else 1,
        "first_k_dense_replace": cfg.moe_first_k_dense if moe else 0,
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
        "rope_theta": ROPE_THETA,
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


def _hf_defaults() -> dict:
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


def model_fields_from_hf(hf: Mapping) -> dict:
    """config.json of a DeepSeekMoE model -> DeepSeekMoEConfig fields (beyond deepseek_defaults).

    Raises ConversionError for what the Megatron model cannot represent.
    """
    c = {**_hf_defaults(), **{k: v for k, v in hf.items()}}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "intermediate_size"):
        if c.get(key) is None:
            raise ConversionError(f"config.json has no {key!r}")
    model_type = hf.get("model_type")
    if model_type not in (None, "deepseek"):
        raise _unsupported("model_type", model_type,
                           "only DeepSeekMoE ('deepseek', deepseek-moe-16b layout) is supported")
    if c["scoring_func"] != "softmax":
        raise _unsupported("scoring_func", c["scoring_func"], "only 'softmax' routing is supported")
    if c["hidden_act"] != "silu":
        raise _unsupported("hidden_act", c["hidden_act"], "only SwiGLU (silu) is supported")
    if c["attention_bias"]:
        raise _unsupported("attention_bias", True, "the Megatron model has no attention biases")
    if c["rope_scaling"]:
        raise _unsupported("rope_scaling", c["rope_scaling"], "RoPE scaling is not supported")
    if c.get("rope_parameters") and c["rope_parameters"].get("rope_type", "default") != "default":
        raise _unsupported("rope_parameters", c["rope_parameters"],
                           "RoPE scaling is not supported")
    if not math.isclose(float(c["rope_theta"]), ROPE_THETA):
        raise _unsupported("rope_theta", c["rope_theta"],
                           f"the Megatron model uses rotary base {ROPE_THETA:g}")
    if c["tie_word_embeddings"]:
        raise _unsupported("tie_word_embeddings", True, "the Megatron model has untied embeddings")
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    if hidden % heads:
        raise _unsupported("num_attention_heads", heads, f"does not divide hidden_size={hidden}")
    if c.get("head_dim") not in (None, hidden // heads):
        raise _unsupported("head_dim", c["head_dim"], "must be hidden_size / num_attention_heads")
    kv = c.get("num_key_value_heads") or heads
    if heads % kv:
        raise _unsupported("num_key_value_heads", kv,
                           f"must divide num_attention_heads={heads}")
    if c.get("pretraining_tp", 1) not in (None, 1):
        _log(f"note: pretraining_tp={c['pretraining_tp']} only split matmuls; ignored")
    fields = dict(
        num_layers=c["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv,
        ffn_hidden_size=c["intermediate_size"],
        layernorm_epsilon=float(c["rms_norm_eps"]),
        init_method_std=float(c["initializer_range"]),
        attention_dropout=float(c["attention_dropout"] or 0.0),
    )
    if c.get("n_routed_experts"):
        freq = c["moe_layer_freq"]
        if not isinstance(freq, int) or freq < 1:
            raise _unsupported("moe_layer_freq", freq, "must be a positive integer")
        if not c.get("num_experts_per_tok") or not c.get("moe_intermediate_size"):
            raise ConversionError("config.json sets n_routed_experts but not "
                                  "num_experts_per_tok / moe_intermediate_size")
        fields.update(
            num_moe_experts=c["n_routed_experts"],
            moe_router_topk=c["num_experts_per_tok"],
            moe_ffn_hidden_size=c["moe_intermediate_size"],
            moe_num_shared_experts=c.get("n_shared_experts") or 0,
            moe_first_k_dense=c["first_k_dense_replace"],
            moe_layer_freq=freq,
            moe_router_pre_softmax=not c["norm_topk_prob"],
            moe_aux_loss_coeff=float(c["aux_loss_alpha"]),
            moe_router_load_balancing_type="seq_aux_loss" if c["seq_aux"] else "aux_loss",
        )
    return fields


def hf_dims(hf: Mapping) -> Dims:
    """Sizes of the HF model that config.json describes (after model_fields_from_hf's checks)."""
    c = {**_hf_defaults(), **hf}
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
        moe_expert_backend="auto", overlap_moe_expert_parallel_comm=False,
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


# ------------------------------------------------------------------------------------------
# Runtime, run configs, output directories
# ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def single_rank_runtime() -> Iterator[None]:
    """A single-process runtime for the duration (reusing one that is already up)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from dsmoe_megatron import runtime

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                "the converter runs as a single process; it was called inside a "
                f"{dist.get_world_size()}-process job (run dsmoe-convert without torchrun)")
        sizes_one = parallel_state.model_parallel_is_initialized() and all(
            f() == 1 for f in (parallel_state.get_tensor_model_parallel_world_size,
                               parallel_state.get_pipeline_model_parallel_world_size,
                               parallel_state.get_expert_model_parallel_world_size))
        if not sizes_one:
            runtime.initialize(runtime.ParallelLayout())
        yield
        return
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConversionError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']}: the converter runs as a single process "
            "(run dsmoe-convert without torchrun)")
    saved = {k: os.environ.get(k) for k in ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        # A MASTER_PORT inherited from a parent that holds it would make the rendezvous fail;
        # without one the runtime uses an in-memory store.
        os.environ.pop("MASTER_PORT", None)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    try:
        runtime.initialize(runtime.ParallelLayout())
        try:
            yield
        finally:
            runtime.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _yaml_config():
    try:
        from dsmoe_megatron import yaml_config
    except ImportError as err:  # pragma: no cover - only while the package is incomplete
        raise ConversionError(f"dsmoe_megatron.yaml_config is not importable: {err}") from err
    return yaml_config


def _begin_output(out_dir: str | Path, force: bool, source: Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ConversionError(f"--out {out} contains the input {source}; choose a separate "
                              "output directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise ConversionError(
                f"output directory {out} exists and is not empty; choose another --out or pass "
                "--force to replace it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return out, partial


def _finish_output(out: Path, partial: Path) -> Path:
    if out.exists():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    os.replace(partial, out)
    return out


def _resolve_checkpoint(path: str | Path) -> Path:
    from dsmoe_megatron import checkpoint

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"checkpoint directory {path} does not exist (--checkpoint)")
    try:
        return checkpoint.resolve(path)
    except checkpoint.CheckpointError as err:
        raise ConversionError(str(err)) from err


def parse_size(text: str | int) -> int:
    """'5GB', '200MB', '1GiB', '4096' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", str(text).upper())
    if not m:
        raise ConversionError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 1048576")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    unit = m.group(2) or ""
    if unit not in units:
        raise ConversionError(f"unknown size unit in {text!r}")
    return int(float(m.group(1)) * units[unit])


# ------------------------------------------------------------------------------------------
# safetensors I/O
# ------------------------------------------------------------------------------------------

def write_safetensors_shards(tensors: Mapping[str, torch.Tensor], out_dir: Path,
                             max_shard_size: int, dtype: torch.dtype) -> list[str]:
    """Write ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    total, weight_map, files = 0, {}, []
    for index, names in enumerate(groups, start=1):
        filename = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            t = tensors[name].detach().to(device="cpu", dtype=dtype, copy=True)
            shard[name] = t.contiguous()
            total += t.numel() * t.element_size()
            weight_map[name] = filename
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        files.append(filename)
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


class SafetensorsReader:
    """Lazily reads the tensors of a Hugging Face directory (index + shards, or one file)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: hf_dir / f for name, f in weight_map.items()}
        else:
            candidates = sorted(hf_dir.glob("*.safetensors"))
            if not candidates:
                pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + \
                    sorted(p.name for p in hf_dir.glob("*.pt"))
                hint = (f" (found {pickles}: pickle checkpoints are not read; convert them to "
                        "safetensors first)") if pickles else ""
                raise ConversionError(f"no safetensors weights in {hf_dir}{hint}")
            files = {}
            for path in candidates:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        files[name] = path
        for path in set(files.values()):
            if not path.exists():
                raise ConversionError(f"{path.name}, listed in the index, is missing from {hf_dir}")
        self.files = files
        self._handles: dict[Path, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, path in files.items():
            try:
                self.shapes[name] = tuple(self._handle(path).get_slice(name).get_shape())
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise ConversionError(f"cannot read tensor {name} from {path.name}: {err}") from err

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._safe_open(str(path), framework="pt")
        return self._handles[path]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.files[name]).get_tensor(name)


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------

HF_SOURCE_DIR = "hf_source"
"""from-hf keeps the source's config.json and tokenizer files here, next to ``latest``."""

_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass
class TokenizerExport:
    """Which tokenizer files go with an export and the special-token ids for config.json."""

    source: str  # "byte", a directory, or "none"
    token_ids: dict
    directory: Path | None = None

    def write(self, out: Path) -> list[str]:
        if self.source == "byte":
            try:
                from dsmoe_megatron.tokenizer import write_hf_tokenizer
            except ImportError:
                _log("no tokenizer-file writer available; tokenizer files skipped")
                return []
            try:
                write_hf_tokenizer(out)
            except ImportError as err:
                _log(f"tokenizer files skipped: {err}")
                return []
            return [f for f in TOKENIZER_FILES if (out / f).exists()]
        if self.directory is not None:
            copied = []
            for name in TOKENIZER_FILES:
                if (self.directory / name).is_file():
                    shutil.copyfile(self.directory / name, out / name)
                    copied.append(name)
            return copied
        return []


def _token_ids_from(directory: Path) -> dict:
    ids = {}
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            data = json.loads(path.read_text())
            for key in _TOKEN_ID_KEYS:
                if key not in ids and data.get(key) is not None:
                    ids[key] = data[key]
    return ids


def choose_tokenizer(ckpt: Path, vocab_size: int, tokenizer_dir: str | Path | None = None
                     ) -> TokenizerExport:
    """The run's tokenizer: an explicit directory of HF tokenizer files, else the one from-hf
    kept next to the checkpoint (same vocabulary size), else the byte tokenizer when the
    vocabulary is its size; otherwise none (config.json then has no special-token ids)."""
    candidates = []
    if tokenizer_dir is not None:
        directory = Path(tokenizer_dir)
        if not directory.is_dir():
            raise ConversionError(f"tokenizer directory {directory} does not exist (--tokenizer)")
        return TokenizerExport(str(directory), _token_ids_from(directory), directory)
    candidates = [ckpt.parent / HF_SOURCE_DIR, ckpt / HF_SOURCE_DIR]
    for directory in candidates:
        config = directory / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("vocab_size") == vocab_size:
            return TokenizerExport(str(directory), _token_ids_from(directory), directory)
    try:
        from dsmoe_megatron.tokenizer import ByteTokenizer
    except ImportError:
        ByteTokenizer = None
    if ByteTokenizer is not None and ByteTokenizer().vocab_size == vocab_size:
        tok = ByteTokenizer()
        return TokenizerExport("byte", dict(bos_token_id=tok.bos, eos_token_id=tok.eod,
                                            pad_token_id=tok.pad))
    _log(f"vocabulary {vocab_size} is not the byte tokenizer's and no tokenizer files are known; "
         "pass --tokenizer DIR to include them")
    return TokenizerExport("none", {})


# ------------------------------------------------------------------------------------------
# to-hf
# ------------------------------------------------------------------------------------------

def _checkpoint_tensor_info(ckpt: Path) -> tuple[int, torch.dtype]:
    """(padded vocabulary rows, parameter dtype) as saved (read from the torch_dist metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    name = "embedding.word_embeddings.weight"
    try:
        metadata = FileSystemReader(str(ckpt)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any unreadable metadata gets the same answer
        raise ConversionError(f"cannot read the checkpoint metadata in {ckpt}: {err}") from err
    entry = metadata.state_dict_metadata.get(name)
    if entry is None or not hasattr(entry, "size"):
        raise ConversionError(f"{ckpt} has no {name}; is it a model checkpoint of this package?")
    return int(entry.size[0]), entry.properties.dtype


def read_checkpoint_run(ckpt: Path):
    """The RunConfig saved with a checkpoint (machine checks off: the converter runs on CPU)."""
    from dsmoe_megatron import checkpoint

    run_yaml = ckpt / checkpoint.RUN_CONFIG_NAME
    if not run_yaml.exists():
        raise ConversionError(f"{run_yaml} is missing; the checkpoint does not say its model")
    yaml_config = _yaml_config()
    try:
        return yaml_config.load_run_config(run_yaml, instantiate_checks=False)
    except yaml_config.YamlConfigError as err:
        raise ConversionError(str(err)) from err


def load_checkpoint_state(checkpoint_dir: str | Path):
    """(run config, single-rank model config, state dict) of a dist checkpoint of any layout.

    Needs a single-process runtime (see ``single_rank_runtime``).
    """
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.model import build_model

    ckpt = _resolve_checkpoint(checkpoint_dir)
    run = read_checkpoint_run(ckpt)
    padded_vocab, dtype = _checkpoint_tensor_info(ckpt)
    if padded_vocab < run.train.vocab_size:
        raise ConversionError(f"the checkpoint has {padded_vocab} vocabulary rows but its run "
                              f"config says vocab_size={run.train.vocab_size}")
    cfg = single_rank_config(run.model, params_dtype=dtype)
    model = build_model(cfg, padded_vocab, run.train.seq_length, pre_process=True,
                        post_process=True)
    checkpoint.load(ckpt, [model])
    return run, cfg, model.state_dict()


def export_to_hf(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str = "auto",
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
                 tokenizer: bool | str | Path = True) -> Path:
    """Megatron dist checkpoint (any layout) -> Hugging Face directory; returns ``out_dir``.

    ``checkpoint_dir``: a save directory (its latest iteration) or an ``iter_XXXXXXX`` dir.
    ``dtype``: ``auto`` (as stored in the checkpoint), ``bf16``, ``fp16`` or ``fp32``.
    ``tokenizer``: True (see ``choose_tokenizer``), False (no tokenizer files) or a directory
    of Hugging Face tokenizer files to include. Works in a fresh process (it brings up a
    single-process runtime and shuts it down) or inside one that already has a single-rank one.
    """
    from dsmoe_megatron.hf import write_hf_remote_code

    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    max_shard_size = parse_size(max_shard_size)
    ckpt = _resolve_checkpoint(checkpoint_dir)
    run = read_checkpoint_run(ckpt)
    check_exportable(run.model)  # before anything is loaded or created
    vocab = run.train.vocab_size
    if tokenizer is False:
        tok = TokenizerExport("none", {})
    else:
        tok = choose_tokenizer(ckpt, vocab, None if tokenizer is True else tokenizer)
    out, partial = _begin_output(out_dir, force, source=ckpt)
    try:
        with single_rank_runtime():
            run, cfg, state = load_checkpoint_state(ckpt)
        out_dtype = DTYPES[dtype] if dtype != "auto" else cfg.params_dtype
        tensors = megatron_to_hf(state, Dims.from_megatron(cfg, vocab))
        max_pos = max(int(run.train.seq_length), int(run.train.max_position_embeddings or 0))
        config = hf_config_dict(cfg, vocab, max_pos, out_dtype,
                                **{k: tok.token_ids.get(k) for k in _TOKEN_ID_KEYS})
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = {"_from_model_config": True,
                      **{k: v for k, v in tok.token_ids.items() if v is not None}}
        (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        files = write_safetensors_shards(tensors, partial, max_shard_size, out_dtype)
        del state, tensors
        write_hf_remote_code(partial)  # after config.json: adds its auto_map
        tok_files = tok.write(partial)
        _finish_output(out, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _log(f"wrote {out}: {len(files)} safetensors shard(s), {DTYPE_NAMES[out_dtype]}, "
         f"vocab {vocab}; tokenizer: {', '.join(tok_files) if tok_files else 'none'}")
    return out


# ------------------------------------------------------------------------------------------
# from-hf
# ------------------------------------------------------------------------------------------

def read_hf_config(hf_dir: str | Path) -> dict:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"Hugging Face directory {hf_dir} does not exist (--hf)")
    path = hf_dir / "config.json"
    if not path.exists():
        raise ConversionError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err


def make_run_config(model_fields: Mapping, vocab_size: int | None = None,
                    seq_length: int | None = None, overrides: Iterable[str] = (),
                    max_position_embeddings: int | None = None):
    """A yaml_config RunConfig for a model with these DeepSeekMoEConfig fields (plain values),
    each placed in its yaml_config section; the rest from the defaults and ``overrides``.
    ``vocab_size`` None means the byte tokenizer's."""
    yaml_config = _yaml_config()
    source: dict = {}
    for key, value in model_fields.items():
        section = yaml_config.section_of(key)
        if section is None:
            raise ConversionError(f"{key} is not a model field")
        source.setdefault(section, {})[key] = value
    for key, value in (("vocab_size", vocab_size), ("seq_length", seq_length),
                       ("max_position_embeddings", max_position_embeddings)):
        if value is not None:
            source[key] = int(value)
    try:
        return yaml_config.run_config_from_dict(source, tuple(overrides))
    except yaml_config.YamlConfigError as err:
        raise ConversionError(f"run config: {err}") from err


def build_run_config(hf: Mapping, overrides: Iterable[str] = ()):
    """RunConfig for training the HF model: its architecture and vocabulary from config.json,
    seq_length = max_position_embeddings unless overridden, the rest from defaults and
    ``overrides`` (yaml_config's ``section.key=value``)."""
    c = {**_hf_defaults(), **hf}
    positions = int(c["max_position_embeddings"])
    overrides = tuple(overrides)
    seq_override = any(o.split("=", 1)[0].strip() == "seq_length" for o in overrides)
    return make_run_config(model_fields_from_hf(hf), c["vocab_size"],
                           None if seq_override else positions, overrides,
                           max_position_embeddings=positions)


# Fields that fix the shapes or the function of the weights; overrides may not change them.
_ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_num_shared_experts",
    "moe_first_k_dense", "moe_layer_freq", "moe_router_pre_softmax", "layernorm_epsilon",
)


def _check_run_matches_hf(run, hf: Mapping) -> None:
    """Overrides may change training settings, not the architecture the weights have."""
    expected = model_fields_from_hf(hf)
    for key in _ARCHITECTURE_FIELDS:
        if key not in expected:
            continue
        got = getattr(run.model, key)
        if got != expected[key]:
            raise ConversionError(
                f"the run config has model.{key}={got!r} but the Hugging Face model has "
                f"{expected[key]!r}; architecture fields cannot be overridden")
    if "num_moe_experts" not in expected and run.model.num_moe_experts:
        raise ConversionError(
            f"the run config has model.num_moe_experts={run.model.num_moe_experts} but the "
            "Hugging Face model is dense; architecture fields cannot be overridden")
    check_exportable(run.model)
    if run.train.vocab_size != hf["vocab_size"]:
        raise ConversionError(
            f"the run config has vocab_size={run.train.vocab_size} but the Hugging Face model "
            f"has {hf['vocab_size']}; it cannot be overridden")


def _dtype_overrides(dtype: str) -> list[str]:
    if dtype == "auto":
        return []
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return [f"model_parallel.bf16={str(dtype == 'bf16').lower()}",
            f"model_parallel.fp16={str(dtype == 'fp16').lower()}"]


def import_from_hf(hf_dir: str | Path, out_dir: str | Path, overrides: Iterable[str] = (),
                   force: bool = False, dtype: str = "auto") -> Path:
    """Hugging Face directory -> save directory with an iteration-0 dist checkpoint + run.yaml.

    ``overrides``: yaml_config overrides for the run (``model_parallel.tensor_model_parallel_size
    =2``, ``lr=1e-4``...); architecture fields come from config.json and cannot be overridden.
    ``dtype``: the run's parameter dtype (``bf16`` / ``fp16`` set ``model_parallel.bf16`` /
    ``fp16``; ``auto`` keeps the run config's, fp32 by default); the checkpoint stores that.
    The vocabulary is padded for the run's tensor-parallel size, as the trainer builds it.
    The source's config.json and tokenizer files are kept in ``out_dir/hf_source`` so a later
    to-hf can include them. Returns ``out_dir`` (the trainer's ``load:``).
    """
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.model import build_model, padded_vocab_size

    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    run = build_run_config(hf, [*_dtype_overrides(dtype), *overrides])
    _check_run_matches_hf(run, hf)
    dims = hf_dims(hf)
    reader = SafetensorsReader(hf_dir)
    shapes = {n: s for n, s in reader.shapes.items() if not _IGNORED_HF_TENSORS.match(n)}
    _check_shapes(shapes, hf_expected_shapes(dims), f"{hf_dir}:", shape_of=lambda s: s)
    params_dtype = run.model.params_dtype
    padded = padded_vocab_size(dims.vocab, run.layout.tensor)
    out, partial = _begin_output(out_dir, force, source=hf_dir)
    try:
        kept = partial / HF_SOURCE_DIR
        kept.mkdir()
        for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, kept / name)
        yaml_path = partial / "run.yaml.tmp"
        _yaml_config().dump_run_config(run, yaml_path)
        run_yaml_text = yaml_path.read_text()
        yaml_path.unlink()
        with single_rank_runtime():
            cfg = single_rank_config(run.model, params_dtype=params_dtype)
            model = build_model(cfg, padded, run.train.seq_length, pre_process=True,
                                post_process=True)
            own = _normalise_megatron_names(model.state_dict())
            filled = set()
            with torch.no_grad():
                for name, value in iter_hf_to_megatron(reader.get, dims, padded):
                    target = own.get(name)
                    if target is None or target.shape != value.shape:
                        raise ConversionError(
                            f"internal error: {name} {tuple(value.shape)} has no place in the "
                            f"Megatron model ({None if target is None else tuple(target.shape)})")
                    target.copy_(value)
                    filled.add(name)
            if filled != set(own):
                raise ConversionError(f"internal error: Megatron tensors not filled: "
                                      f"{sorted(set(own) - filled)}")
            checkpoint.save(partial, 0, [model], run_config_yaml=run_yaml_text)
            del model, own
        _finish_output(out, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _log(f"wrote {out}: iteration 0, {DTYPE_NAMES[params_dtype]}, vocab {dims.vocab} padded to "
         f"{padded} for tensor parallel size {run.layout.tensor}")
    return out


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

_LAYOUT_FLAGS = (
    ("--tensor-model-parallel-size", "tensor_model_parallel_size"),
    ("--pipeline-model-parallel-size", "pipeline_model_parallel_size"),
    ("--expert-model-parallel-size", "expert_model_parallel_size"),
    ("--expert-tensor-parallel-size", "expert_tensor_parallel_size"),
    ("--virtual-pipeline-model-parallel-size", "virtual_pipeline_model_parallel_size"),
)


def _layout_overrides(args) -> list[str]:
    return [f"model_parallel.{field}={getattr(args, field)}" for _, field in _LAYOUT_FLAGS
            if getattr(args, field) is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsmoe-convert", description="Convert DeepSeekMoE checkpoints between Megatron "
        "dist checkpoints and Hugging Face (deepseek-moe-16b-base layout, safetensors).")
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="Megatron dist checkpoint -> Hugging Face directory")
    to_hf.add_argument("--checkpoint", required=True,
                       help="save directory (its latest iteration) or an iter_XXXXXXX directory")
    to_hf.add_argument("--out", required=True, help="Hugging Face output directory")
    to_hf.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                       help="weights dtype (auto: as stored in the checkpoint)")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    to_hf.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="directory of Hugging Face tokenizer files to include (default: the "
                       "ones from-hf kept, else the byte tokenizer's when the vocabulary fits)")
    to_hf.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")
    to_hf.add_argument("--force", action="store_true", help="replace a non-empty --out")
    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> Megatron dist checkpoint")
    from_hf.add_argument("--hf", required=True, help="directory with config.json + safetensors")
    from_hf.add_argument("--out", required=True,
                         help="save directory to create (run.yaml + iter_0000000; the "
                         "trainer's load:)")
    for flag, field in _LAYOUT_FLAGS:
        from_hf.add_argument(flag, dest=field, type=int, default=None, metavar="N",
                             help=f"model_parallel.{field} in run.yaml")
    from_hf.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                         help="the run's parameter dtype, stored in the checkpoint and run.yaml "
                         "(auto: the run config's, fp32 unless --set model_parallel.bf16=true)")
    from_hf.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="[SECTION.]KEY=VALUE",
                         help="run.yaml override, e.g. model_parallel.bf16=true or lr=1e-4 "
                         "(repeatable)")
    from_hf.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-hf":
            export_to_hf(args.checkpoint, args.out, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, force=args.force,
                         tokenizer=False if args.no_tokenizer else (args.tokenizer or True))
        else:
            import_from_hf(args.hf, args.out, overrides=[*_layout_overrides(args),
                                                         *args.overrides],
                           force=args.force, dtype=args.dtype)
    except ConversionError as err:
        print(f"dsmoe-convert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
