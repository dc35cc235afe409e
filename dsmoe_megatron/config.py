"""DeepSeekMoE configuration: Megatron-core's TransformerConfig plus the few fields it has no name for.

Megatron-core names are reused wherever they mean the same thing:

=============================================  ==============================================
DeepSeekMoE                                    field
=============================================  ==============================================
routed experts mN - Ks                         ``num_moe_experts``
activated routed experts mK - Ks               ``moe_router_topk``
expert width (FFN / m)                         ``moe_ffn_hidden_size``
dense-layer FFN width                          ``ffn_hidden_size``
shared width Ks x expert width                 ``moe_shared_expert_intermediate_size`` (derived)
expert-level balance factor a1                 ``moe_aux_loss_coeff``
per-batch / per-sequence balance statistics    ``moe_router_load_balancing_type``:
                                               ``aux_loss`` / ``seq_aux_loss``
top-k weights not renormalised (DeepSeekMoE)   ``moe_router_pre_softmax=True`` (softmax over all
                                               experts, then top-k); ``False`` renormalises
FP8                                            ``fp8`` (``"e4m3"`` / ``"hybrid"``) and
                                               ``fp8_recipe``; needs TE and a GPU that runs
                                               the recipe (``mxfp8``: B200 / B300)
=============================================  ==============================================

Added here: the shared-expert count, the first dense layers, the device-level balance loss and
the expert GEMM backend; and ``rotary_base``, the RoPE base, which Megatron-core takes as a
GPTModel argument (Megatron-LM's ``--rotary-base``) rather than a TransformerConfig field.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from dsmoe_megatron import field_ranges

EXPERT_BACKENDS = ("auto", "te", "grouped_mm", "sequential")
BALANCE_TYPES = ("aux_loss", "seq_aux_loss", "none")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


@dataclass
class DeepSeekMoEConfig(TransformerConfig):
    moe_num_shared_experts: int = 0
    """Ks: shared experts, always active; fused into one MLP of width Ks x moe_ffn_hidden_size."""

    moe_first_k_dense: int = 0
    """The first k layers keep a dense FFN of width ffn_hidden_size (the 16B and 145B models: 1)."""

    moe_device_balance_coeff: float = 0.0
    """a2, the device-level balance factor."""

    moe_device_groups: int | None = None
    """D, the number of device groups for the device-level loss; None means the EP size."""

    moe_expert_backend: str = "auto"
    """Routed-expert GEMMs: auto | te | grouped_mm | sequential (the plain-loop reference)."""

    rotary_base: float = 10000.0
    """The RoPE base (Megatron-LM's --rotary-base, Hugging Face's rope_theta)."""

    def __post_init__(self):
        _fill_deepseek_defaults(self)
        super().__post_init__()
        validate(self)

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def moe_layer_pattern(self) -> list[bool]:
        """True for each layer (0-based) whose FFN is a DeepSeekMoE block."""
        if not self.is_moe:
            return [False] * self.num_layers
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            pattern = [i % freq == 0 for i in range(self.num_layers)]
        else:
            pattern = [bool(v) for v in freq]
        return [moe and i >= self.moe_first_k_dense for i, moe in enumerate(pattern)]

    def num_device_groups(self) -> int:
        return self.moe_device_groups or self.expert_model_parallel_size


# Megatron's CUDA graph switches, with the value that keeps graphs off.
_CUDA_GRAPHS_OFF = {"enable_cuda_graph": False, "external_cuda_graph": False,
                    "cuda_graph_impl": "none"}
# The oldest GPU (compute capability) each low-precision recipe runs on, as Transformer
# Engine's recipe checks have it.
_RECIPE_MIN_CAPABILITY = {
    ("fp8", "delayed"): (8, 9), ("fp8", "tensorwise"): (8, 9), ("fp8", "custom"): (8, 9),
    ("fp8", "blockwise"): (9, 0), ("fp8", "mxfp8"): (10, 0),
    ("fp4", "nvfp4"): (10, 0), ("fp4", "custom"): (10, 0),
}
_GPU_GENERATIONS = {(8, 9): "FP8 tensor cores: Ada, Hopper or newer", (9, 0): "Hopper or newer",
                    (10, 0): "Blackwell"}
# The first GPU a recipe stops running on: Transformer Engine has no MXFP8 GEMMs for compute
# capability 12.x (RTX / workstation Blackwell), only for 10.x (B200, B300).
_RECIPE_END_CAPABILITY = {("fp8", "mxfp8"): (12, 0)}
# The CUDA a recipe's Transformer Engine kernels need of torch's build (torch.version.cuda).
_RECIPE_MIN_CUDA = {("fp8", "blockwise"): (12, 9)}


_DROPLESS = "routing is dropless: every token reaches its k experts"
_UNGROUPED = "each token picks its k experts among all routed experts"
_IN_FORWARD = "the expert-parallel all-to-all runs inside the block's forward, in order"
_IN_BACKWARD = "weight gradients are computed in the backward pass, as usual"
_PER_EXPERT = ("the routed experts run Transformer Engine's GroupedLinear with one weight per "
               "expert, or torch's grouped GEMM")
# Megatron-core MoE settings the DeepSeekMoE block does not implement, with the values that
# mean "off" and what the block does instead: setting one is an error, not a run without it.
_NOT_IMPLEMENTED = {
    "moe_expert_capacity_factor": ((None,), _DROPLESS),
    "moe_expert_rank_capacity_factor": ((None,), _DROPLESS),
    "moe_pad_expert_input_to_capacity": ((False,), _DROPLESS),
    "moe_token_dropping": ((False,), _DROPLESS),
    "moe_router_topk_scaling_factor": ((None,), "the gates are the chosen experts' softmax "
                                       "scores (renormalised with moe_router_pre_softmax: false)"),
    "moe_z_loss_coeff": ((None, 0.0), "the router's losses are the expert-level "
                         "(moe_aux_loss_coeff) and device-level (moe_device_balance_coeff) ones"),
    "moe_input_jitter_eps": ((None, 0.0), "the router sees the hidden states as they are"),
    "moe_router_num_groups": ((None,), _UNGROUPED),
    "moe_router_group_topk": ((None,), _UNGROUPED),
    "moe_router_topk_limited_devices": ((None,), _UNGROUPED),
    "moe_router_enable_expert_bias": ((False,), "balance comes from the balance losses"),
    "moe_router_force_load_balancing": ((False,), "the router routes by its scores"),
    "moe_router_dtype": ((None, "fp32"), "the router computes in fp32"),
    "moe_shared_expert_gate": ((False,), "the shared experts are always on, ungated"),
    "moe_apply_probs_on_input": ((False,), "the gates weight the experts' outputs"),
    "moe_latent_size": ((None,), "the experts take the hidden states at full width"),
    # Hooks of Megatron's MoELayer and its schedules that the block has no counterpart for:
    # with them Transformer Engine's layers defer the weight gradients to backward_dw() calls
    # that nothing makes (the expert weights would not train), or the schedule asks the model
    # for Megatron's per-layer sub-steps.
    "overlap_moe_expert_parallel_comm": ((False,), _IN_FORWARD),
    "delay_wgrad_compute": ((False,), _IN_BACKWARD),
    "overlap_dispatch_backward_with_experts_wgrad": ((False,), _IN_BACKWARD),
    # Transformer Engine's op fuser and single grouped weight are for Megatron's expert MLP;
    # the block would only pad every expert's rows to 256 and break its per-expert checkpoint.
    "use_transformer_engine_op_fuser": ((False,), _PER_EXPERT),
    "moe_single_grouped_weight": ((False,), _PER_EXPERT),
}


def _check_before_megatron(cfg: DeepSeekMoEConfig) -> None:
    """Checks that must come before TransformerConfig's own, whose messages are less direct
    (or that it lacks: it divides by zero, or accepts what cannot run)."""
    integers = _integer_fields(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in integers and value is not None and not _is_integer(value):
            raise ConfigError(f"{f.name}={value!r}: must be an integer (a size or count)")
        problem = field_ranges.problem(f.name, value)
        if problem:
            raise ConfigError(f"{f.name}={value!r}: {problem}")
    for name, (off, instead) in _NOT_IMPLEMENTED.items():
        value = getattr(cfg, name)
        if value not in off:
            raise ConfigError(
                f"{name}={value!r} is a Megatron-core MoE setting the DeepSeekMoE block does "
                f"not implement ({instead}); remove it")
    # The layers without Transformer Engine always build RMSNorm, and the routed experts are
    # always bias-free SwiGLU: another value would describe another model than the one built.
    if cfg.normalization != "RMSNorm":
        raise ConfigError(
            f"normalization={cfg.normalization!r}: DeepSeekMoE models use RMSNorm (only "
            "Transformer Engine's layers would build another norm); set it to RMSNorm "
            "(Megatron-LM: --normalization RMSNorm)")
    if cfg.is_moe and not cfg.gated_linear_unit:
        raise ConfigError(
            "gated_linear_unit=False: the routed experts are SwiGLU (gated) on every backend; "
            "set it to true (Megatron-LM: --swiglu)")
    for name, off in (("glu_linear_offset", 0.0), ("activation_func_clamp_value", None)):
        if cfg.is_moe and getattr(cfg, name) != off:
            raise ConfigError(
                f"{name}={getattr(cfg, name)!r}: the routed experts' SwiGLU is silu(gate) * up, "
                "as DeepSeekMoE's, on every backend (only Megatron's dense and shared MLPs would "
                "apply it); remove it")
    if cfg.is_moe and cfg.add_bias_linear:
        raise ConfigError(
            "add_bias_linear=True: the routed experts have no biases (DeepSeekMoE has none); "
            "set it to false (Megatron-LM: --disable-bias-linear)")
    if isinstance(cfg.moe_aux_loss_coeff, (list, tuple)):
        raise ConfigError(
            f"moe_aux_loss_coeff={cfg.moe_aux_loss_coeff!r}: one number, the expert-level "
            "balance factor a1 (Megatron's list pairs coefficients with a list of balance "
            "types; DeepSeekMoE has one expert-level loss, and the device-level one is "
            "moe_device_balance_coeff)")
    if cfg.context_parallel_size != 1:
        raise ConfigError(
            f"context_parallel_size={cfg.context_parallel_size}: context parallelism is not "
            "supported with the DeepSeekMoE block (its per-sequence balance statistics would "
            "see only each rank's part of a sequence); use 1")
    if cfg.mtp_num_layers:
        # GPTModel gets no MTP block, and its forward then fails on the labels' shape
        raise ConfigError(
            f"mtp_num_layers={cfg.mtp_num_layers}: multi-token prediction is not supported with "
            "the DeepSeekMoE model (it predicts the next token only); remove it")
    _check_attention_heads(cfg)
    freq = cfg.moe_layer_freq
    if not (_is_integer(freq) and freq >= 1 or isinstance(freq, (list, tuple)) and (
            len(freq) == cfg.num_layers and all(_is_integer(v) and v in (0, 1) for v in freq))):
        raise ConfigError(
            f"moe_layer_freq={freq!r} must be an integer N >= 1 (every N-th layer is MoE) or a "
            f"list with one 0 (dense) or 1 (MoE) per layer ({cfg.num_layers} entries)")
    if cfg.moe_num_shared_experts and cfg.moe_shared_expert_intermediate_size is None:
        if cfg.moe_ffn_hidden_size is None:
            raise ConfigError(
                "moe_num_shared_experts > 0 needs an expert width: set moe_ffn_hidden_size"
            )
    for name, off in _CUDA_GRAPHS_OFF.items():
        value = getattr(cfg, name)
        if value != off:
            raise ConfigError(
                f"{name}={value!r}: CUDA graphs are not supported with the DeepSeekMoE block: "
                "its dropless routing reads the per-expert token counts on the host (the expert-"
                "parallel all-to-all split sizes, Transformer Engine's GroupedLinear splits), "
                f"which a captured graph would freeze; set {name}: {str(off).lower()}")
    _check_low_precision(cfg)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@functools.cache
def _integer_fields(cls) -> frozenset[str]:
    """The fields annotated int (or int | None): sizes, counts, parallel sizes. Python does not
    check annotations, and a float (1408.0) or a bool would reach the layers' shapes."""
    return frozenset(name for name, tp in typing.get_type_hints(cls).items()
                     if tp in (int, int | None))


def _head_counts_near(hidden: int, heads: int) -> str:
    """Head counts next to ``heads`` that divide ``hidden`` into an even head dimension (RoPE
    rotates channel pairs), or into any, for an odd ``hidden``."""
    divisors = [d for d in range(1, hidden + 1) if hidden % d == 0]
    divisors = [d for d in divisors if hidden // d % 2 == 0] or divisors
    near = [max(d for d in divisors if d < heads), *[d for d in divisors if d > heads][:1]]
    return " or ".join(map(str, near))


def _check_attention_heads(cfg: DeepSeekMoEConfig) -> None:
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    if cfg.kv_channels is None and hidden % heads:
        raise ConfigError(
            f"num_attention_heads={heads} does not divide hidden_size={hidden} (each head gets "
            f"hidden_size / num_attention_heads channels); use a head count that divides it, "
            f"e.g. {_head_counts_near(hidden, heads)}, or set kv_channels")
    groups = cfg.num_query_groups
    if groups is not None and heads % groups:
        raise ConfigError(
            f"num_query_groups={groups} does not divide num_attention_heads={heads} (each "
            "key/value head serves the same number of query heads); pick a divisor or null")


def check_rope_head_dim(cfg: DeepSeekMoEConfig) -> None:
    """The model's attention (not the MoE block alone) needs an even head dimension: rotary
    position embeddings rotate pairs of channels (Megatron's RoPE fails at the first step)."""
    heads, hidden, head_dim = cfg.num_attention_heads, cfg.hidden_size, cfg.kv_channels
    if head_dim % 2 == 0:
        return
    if hidden == head_dim * heads:
        where = f"hidden_size={hidden} / num_attention_heads={heads} = {head_dim}"
        fix = (f"use num_attention_heads={_head_counts_near(hidden, heads)}, or set an even "
               "kv_channels" if hidden % 2 == 0 else "use an even hidden_size")
    else:
        where, fix = f"kv_channels={head_dim}", "set an even kv_channels"
    raise ConfigError(f"the head dimension ({where}) is odd, but rotary position embeddings "
                      f"(RoPE) rotate pairs of channels; {fix}")


def _check_low_precision(cfg: DeepSeekMoEConfig) -> None:
    """FP8 / FP4 need Transformer Engine and a GPU generation that runs the recipe."""
    for fmt in ("fp8", "fp4"):
        if not getattr(cfg, fmt):
            continue
        recipe_field = f"{fmt}_recipe"
        recipe = getattr(cfg, recipe_field)
        recipe = getattr(recipe, "value", recipe)  # Megatron-LM passes its recipe enums
        setting = f"{fmt}={getattr(cfg, fmt)!r} ({recipe_field}={recipe!r})"
        if not _te_available():
            raise ConfigError(
                f"{setting} needs Transformer Engine, which does not import here; install "
                f"dsmoe-megatron[te] on a CUDA machine or set {fmt}: null")
        cuda = _RECIPE_MIN_CUDA.get((fmt, recipe))
        if cuda is not None and _gpu_capability() is not None and _torch_cuda() < cuda:
            raise ConfigError(
                f"{setting} needs torch built for CUDA >= {cuda[0]}.{cuda[1]} (Transformer "
                f"Engine's block-scaled FP8 GEMMs); this torch is built for CUDA "
                f"{torch.version.cuda}: install a torch for CUDA {cuda[0]}.{cuda[1]} or newer "
                f"(PyPI's default is CUDA 13), or use {recipe_field}: tensorwise")
        need = _RECIPE_MIN_CAPABILITY.get((fmt, recipe))
        end = _RECIPE_END_CAPABILITY.get((fmt, recipe))
        if need is None or _gpu_supports(need, end):
            continue
        have = _gpu_capability()
        usable = [r for (f, r), c in _RECIPE_MIN_CAPABILITY.items()
                  if f == fmt and r != "custom" and have is not None and c <= have
                  and have < _RECIPE_END_CAPABILITY.get((f, r), (99, 0))]
        fix = (f"use {recipe_field}: {' or '.join(usable)}, or set {fmt}: null" if usable
               else f"set {fmt}: null on this machine")
        here = f"this GPU is {have[0]}.{have[1]}" if have else "there is no GPU here"
        beyond = (f" and below {end[0]}.{end[1]} (Transformer Engine has no {recipe} kernels for "
                  f"{end[0]}.x)" if end and have and have >= end else "")
        raise ConfigError(
            f"{setting} needs a GPU of compute capability >= {need[0]}.{need[1]} "
            f"({_GPU_GENERATIONS[need]}){beyond}; {here}: {fix}")


def _fill_deepseek_defaults(cfg: DeepSeekMoEConfig) -> None:
    _check_before_megatron(cfg)
    _fit_hot_path(cfg)
    # Dense and MoE layers differ, so checkpoints key every layer by its global index
    # (decoder.layers.N....) instead of stacking layers along one axis.
    cfg.hetereogenous_dist_checkpoint = True
    if cfg.virtual_pipeline_model_parallel_size:
        # Interleaved stages at PP=2 send both ways between the same two ranks in one step;
        # batched p2p would pair the messages wrongly (Megatron-LM turns it off here too).
        cfg.batch_p2p_comm = False
    if cfg.moe_num_shared_experts and cfg.moe_shared_expert_intermediate_size is None:
        cfg.moe_shared_expert_intermediate_size = (
            cfg.moe_num_shared_experts * cfg.moe_ffn_hidden_size
        )


def validate(cfg: DeepSeekMoEConfig) -> None:
    """Checks beyond TransformerConfig's own, each with the field and the fix in its message."""
    tp = cfg.tensor_model_parallel_size
    ep = cfg.expert_model_parallel_size
    etp = cfg.expert_tensor_parallel_size or tp
    if cfg.moe_expert_backend not in EXPERT_BACKENDS:
        raise ConfigError(
            f"moe_expert_backend={cfg.moe_expert_backend!r} is unknown; use one of {EXPERT_BACKENDS}"
        )
    if not 0 <= cfg.moe_first_k_dense <= cfg.num_layers:
        raise ConfigError(
            f"moe_first_k_dense={cfg.moe_first_k_dense} must be between 0 and num_layers "
            f"({cfg.num_layers})"
        )
    if cfg.ffn_hidden_size % tp:
        raise ConfigError(
            f"ffn_hidden_size={cfg.ffn_hidden_size} is not divisible by "
            f"tensor_model_parallel_size={tp}; pick a width that is a multiple of {tp}"
        )
    if not cfg.is_moe:
        if cfg.moe_num_shared_experts or cfg.moe_device_balance_coeff:
            raise ConfigError(
                "moe_num_shared_experts / moe_device_balance_coeff are set but num_moe_experts is "
                "not; set num_moe_experts (the routed experts) or drop the MoE fields"
            )
        return
    n, k = cfg.num_moe_experts, cfg.moe_router_topk
    if not 1 <= k <= n:
        raise ConfigError(
            f"moe_router_topk={k} must be between 1 and num_moe_experts={n} (the routed experts; "
            "shared experts are not counted)"
        )
    if cfg.moe_ffn_hidden_size % etp:
        raise ConfigError(
            f"moe_ffn_hidden_size={cfg.moe_ffn_hidden_size} is not divisible by the expert "
            f"tensor parallel size {etp}; pick an expert width that is a multiple of {etp} or "
            "set expert_tensor_parallel_size: 1"
        )
    if n % ep:
        raise ConfigError(
            f"num_moe_experts={n} is not divisible by expert_model_parallel_size={ep}; "
            f"choose an EP size that divides {n}"
        )
    shared = cfg.moe_shared_expert_intermediate_size
    if cfg.moe_num_shared_experts:
        if shared != cfg.moe_num_shared_experts * cfg.moe_ffn_hidden_size:
            raise ConfigError(
                f"moe_shared_expert_intermediate_size={shared} disagrees with "
                f"moe_num_shared_experts={cfg.moe_num_shared_experts} x moe_ffn_hidden_size="
                f"{cfg.moe_ffn_hidden_size}; set only moe_num_shared_experts"
            )
    elif shared:
        raise ConfigError(
            f"moe_shared_expert_intermediate_size={shared} is set with moe_num_shared_experts=0; "
            "set moe_num_shared_experts (the width is derived from it)"
        )
    if shared and shared % tp:
        raise ConfigError(
            f"shared expert width {shared} is not divisible by tensor_model_parallel_size={tp}"
        )
    if cfg.moe_router_load_balancing_type not in BALANCE_TYPES:
        raise ConfigError(
            f"moe_router_load_balancing_type={cfg.moe_router_load_balancing_type!r}: DeepSeekMoE "
            f"supports {BALANCE_TYPES} (aux_loss = per-batch statistics, seq_aux_loss = "
            "per-sequence)"
        )
    if cfg.moe_router_score_function != "softmax":
        raise ConfigError(
            "moe_router_score_function must be 'softmax' for DeepSeekMoE "
            f"(got {cfg.moe_router_score_function!r})"
        )
    groups = cfg.num_device_groups()
    if cfg.moe_device_balance_coeff > 0 and groups < 2:
        raise ConfigError(
            f"moe_device_balance_coeff={cfg.moe_device_balance_coeff} needs at least 2 device "
            f"groups but there is {groups} (moe_device_groups, default the EP size); set "
            "moe_device_groups >= 2 or moe_device_balance_coeff: 0"
        )
    if n % groups:
        raise ConfigError(
            f"num_moe_experts={n} is not divisible by moe_device_groups={groups}"
        )
    if ep > 1 and cfg.moe_device_groups and cfg.moe_device_groups % ep and ep % cfg.moe_device_groups:
        raise ConfigError(
            f"moe_device_groups={cfg.moe_device_groups} neither divides nor is a multiple of "
            f"expert_model_parallel_size={ep}; groups should follow the EP ranks"
        )
    if cfg.moe_expert_backend == "te" and not _te_available():
        raise ConfigError(
            "moe_expert_backend='te' needs Transformer Engine, which does not import here; use "
            "'auto' (picks te > grouped_mm > sequential) or install dsmoe-megatron[te]"
        )
    if cfg.moe_expert_backend == "grouped_mm" and not _grouped_mm_runs(cfg.params_dtype):
        raise ConfigError(
            "moe_expert_backend='grouped_mm' needs torch._grouped_mm for this device and "
            f"params_dtype {cfg.params_dtype} (torch >= 2.8 for bf16 on sm90 GPUs, >= 2.9 on other "
            "GPUs, in other dtypes and on the CPU); use 'auto' (the per-expert loop here) or a "
            "newer torch"
        )


def _te_available() -> bool:
    from dsmoe_megatron.backends import te_available

    return te_available()


def _grouped_mm_runs(dtype: torch.dtype) -> bool:
    from dsmoe_megatron.backends import grouped_mm_runs

    return grouped_mm_runs(dtype)


def _gpu_capability() -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def _torch_cuda() -> tuple[int, ...]:
    return tuple(int(part) for part in (torch.version.cuda or "0.0").split(".")[:2])


def _gpu_supports(capability: tuple[int, int], end: tuple[int, int] | None = None) -> bool:
    """Whether this GPU's compute capability is ``capability`` or newer (and below ``end``)."""
    have = _gpu_capability()
    return have is not None and have >= capability and (end is None or have < end)


def _gpu_supports_fp8() -> bool:
    """Whether this GPU runs FP8 at all (the delayed / tensorwise recipes)."""
    return _gpu_supports(_RECIPE_MIN_CAPABILITY[("fp8", "delayed")])


def deepseek_defaults() -> dict:
    """Field values shared by every DeepSeekMoE model (SwiGLU, RMSNorm, RoPE, no biases), with
    Megatron's kernel fusions on where this machine runs them."""
    return dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_router_pre_softmax=True,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_router_topk_scaling_factor=None,
        moe_token_dispatcher_type="alltoall",  # what the routed experts do (dropless)
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **machine_fusions(),
    )


# ---- hot path: kernel fusions, selective recompute, FP8 padding ----------------------------

FUSIONS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
           "apply_rope_fusion", "gradient_accumulation_fusion", "moe_permute_fusion")


def machine_fusions() -> dict[str, bool]:
    """Megatron-core's kernel fusions this machine can run; the one place they are chosen.

    GPU: the compiled SwiGLU (our weighted SwiGLU too) and bias-dropout-add; with Transformer
    Engine its fused RoPE and MoE permute / unpermute; with apex's fused_weight_gradient_mlp_cuda
    the fused weight-gradient accumulation; Megatron-LM's softmax kernels where they are built.
    CPU: none.
    """
    from dsmoe_megatron.backends import te_available

    gpu = torch.cuda.is_available()
    te = gpu and te_available()  # TE's kernels run on a GPU only
    return dict(
        bias_activation_fusion=gpu,
        bias_dropout_fusion=gpu,
        masked_softmax_fusion=gpu and all(map(_extension_imports, _SOFTMAX_KERNELS)),
        apply_rope_fusion=te,
        gradient_accumulation_fusion=gpu and _extension_imports("fused_weight_gradient_mlp_cuda"),
        moe_permute_fusion=te and _mcore_fused_permute(),
    )


# Megatron's fused softmax imports each where its mask calls for it (causal: upper-triangular).
_SOFTMAX_KERNELS = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda",
                    "scaled_softmax_cuda")


@functools.cache
def _extension_imports(module: str) -> bool:
    """Whether a compiled kernel extension imports: one built against another torch or CUDA is
    found but fails to import, and Megatron then refuses the fusion (gradient accumulation: at
    model build) or fails at its first use (softmax)."""
    from dsmoe_megatron.backends import importable

    return importable(module, module, "The fusion that needs it stays off; rebuild the package "
                      "that provides it (apex, Megatron-LM's fused kernels) for this torch and "
                      "CUDA.")


def _mcore_fused_permute() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return all(getattr(moe_utils, name, None) is not None for name in (
        "fused_permute", "fused_permute_with_probs", "fused_unpermute",
        "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs"))


def _fit_hot_path(cfg: DeepSeekMoEConfig) -> None:
    """Fusions this machine cannot run are turned off (a run config written on a GPU machine
    loads on a CPU one); recompute and FP8 padding settings are checked."""
    allowed = machine_fusions()
    for name in FUSIONS:
        setattr(cfg, name, bool(getattr(cfg, name)) and allowed[name])
    if cfg.activation_func is F.silu and not cfg.gated_linear_unit:
        # Megatron's MLP fuses silu only as SwiGLU; a plain silu MLP (a dense model without
        # gated_linear_unit) would fail at its first forward with the fusion on.
        cfg.bias_activation_fusion = False
    if cfg.moe_router_padding_for_fp8 or cfg.moe_router_padding_for_quantization:
        raise ConfigError(
            "moe_router_padding_for_fp8 / moe_router_padding_for_quantization route extra tokens "
            "in Megatron's router; DeepSeekMoE's experts pad each expert's rows for FP8 "
            "themselves (exactly, no extra tokens): remove the key"
        )
    if recomputes_moe_act(cfg):
        cfg.moe_grouped_gemm = True


def recomputes_moe_act(settings) -> bool:
    """Whether a config (or Megatron-LM's arguments) recomputes the expert activation, for which
    Megatron asks moe_grouped_gemm (it guards moe_act against its SequentialMLP; our experts are
    grouped on every backend and support it)."""
    return (settings.recompute_granularity == "selective"
            and "moe_act" in (settings.recompute_modules or ()))


def derive_from_baseline(ffn_hidden_size: int, num_experts: int, topk: int,
                         segmentation: int, shared: int) -> dict:
    """The paper's recipe: split each of N experts (top-K) into m, isolate Ks of them as shared.

    Returns the DeepSeekMoE fields: mN - Ks routed experts, mK - Ks activated, width FFN / m.
    """
    for name, value, lowest in (("ffn_hidden_size", ffn_hidden_size, 1),
                                ("num_experts", num_experts, 1), ("topk", topk, 1),
                                ("segmentation", segmentation, 1), ("shared", shared, 0)):
        if not _is_integer(value) or value < lowest:
            raise ConfigError(f"derive_from_baseline: {name}={value!r} must be an integer >= "
                              f"{lowest}")
    if topk > num_experts:
        raise ConfigError(f"derive_from_baseline: topk={topk} must be at most num_experts="
                          f"{num_experts} (each token picks K of the baseline's N experts)")
    m, ks = segmentation, shared
    if ffn_hidden_size % m:
        raise ConfigError(f"derive_from_baseline: segmentation={m} (m) must divide "
                          f"ffn_hidden_size={ffn_hidden_size}")
    if ks >= m * topk:
        raise ConfigError(f"derive_from_baseline: shared={ks} (Ks) must be below segmentation x "
                          f"topk = {m * topk} (at least one routed expert must stay active)")
    return dict(
        num_moe_experts=m * num_experts - ks,
        moe_router_topk=m * topk - ks,
        moe_ffn_hidden_size=ffn_hidden_size // m,
        moe_num_shared_experts=ks,
    )


def replace(cfg: DeepSeekMoEConfig, **changes) -> DeepSeekMoEConfig:
    """A copy with some fields changed, validated again."""
    return dataclasses.replace(cfg, **changes)
