"""Configuration of DeepSeekMoE models in the layout of the released ``deepseek-moe-16b-base`` checkpoint.

This file is also shipped as Hugging Face remote code next to exported weights, so it may import only
``transformers``. It is written in the ``__init__`` style of remote code (not as a dataclass), which every
transformers 5.x accepts: the dataclass configs of 5.4+ would leave the fields unset on 5.0-5.3.
"""

from transformers import PretrainedConfig


class DeepseekConfig(PretrainedConfig):
    """DeepSeekMoE: pre-norm Llama-style decoder whose MLPs are, from layer ``first_k_dense_replace`` on (every
    ``moe_layer_freq``-th layer), a softmax top-k router over ``n_routed_experts`` fine-grained experts plus
    ``n_shared_experts`` always-on experts fused into one MLP of width ``n_shared_experts * moe_intermediate_size``.

    Defaults are the deepseek-moe-16b-base values (the released configuration code had other defaults,
    e.g. 30 layers and ``moe_intermediate_size=1407``); ``aux_loss_alpha`` and ``seq_aux``, which the released
    config.json omits, default to the values of the released code. ``n_routed_experts=None`` gives a dense model.
    ``rope_theta`` / ``rope_scaling`` are kept as plain fields, as in the released config.json, rather than
    being folded into transformers 5's ``rope_parameters``; a config.json that has only ``rope_parameters`` is read
    from it.
    """

    model_type = "deepseek"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    # The defaults, as class attributes (read by dsmoe_megatron.hf.mapping for fields a config.json omits).
    vocab_size = 102400
    hidden_size = 2048
    intermediate_size = 10944
    moe_intermediate_size = 1408
    num_hidden_layers = 28
    num_attention_heads = 16
    num_key_value_heads = None  # None: num_attention_heads
    n_shared_experts = 2
    n_routed_experts = 64
    num_experts_per_tok = 6
    moe_layer_freq = 1
    first_k_dense_replace = 1
    norm_topk_prob = False
    scoring_func = "softmax"
    aux_loss_alpha = 0.001
    seq_aux = True
    hidden_act = "silu"
    max_position_embeddings = 4096
    initializer_range = 0.02
    rms_norm_eps = 1e-6
    use_cache = True
    pretraining_tp = 1  # in the released config.json; unused here
    # Class attributes shadow PretrainedConfig's `rope_scaling` property (which maps onto rope_parameters).
    rope_theta = 10000.0
    rope_scaling = None
    attention_bias = False
    attention_dropout = 0.0
    pad_token_id = None
    bos_token_id = 100000
    eos_token_id = 100001
    tie_word_embeddings = False
    _FIELDS = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts",
        "num_experts_per_tok", "moe_layer_freq", "first_k_dense_replace", "norm_topk_prob", "scoring_func",
        "aux_loss_alpha", "seq_aux", "hidden_act", "max_position_embeddings", "initializer_range",
        "rms_norm_eps", "use_cache", "pretraining_tp", "rope_theta", "rope_scaling", "attention_bias",
        "attention_dropout",
    )
    # Set by PretrainedConfig itself (before transformers 5.4 from its own __init__ arguments).
    _BASE_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")

    def __init__(self, **kwargs):
        # A config.json written in transformers 5's style keeps the RoPE settings in rope_parameters only.
        rope = kwargs.get("rope_parameters") or {}
        if "rope_theta" in rope:
            if kwargs.get("rope_theta") is None:
                kwargs["rope_theta"] = rope["rope_theta"]
            elif kwargs["rope_theta"] != rope["rope_theta"]:
                raise ValueError(f"rope_theta={kwargs['rope_theta']} and rope_parameters.rope_theta="
                                 f"{rope['rope_theta']}: two RoPE bases; keep the one the model was trained with")
        if rope.get("rope_type", "default") != "default":
            kwargs.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        for name in self._FIELDS:
            setattr(self, name, kwargs.pop(name, getattr(type(self), name)))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.scoring_func != "softmax":
            raise ValueError(f"unsupported scoring_func {self.scoring_func!r}: only 'softmax' is implemented")
        scaling = self.rope_scaling
        if scaling and scaling.get("type", scaling.get("rope_type")) != "linear":
            # Refused on load: the released code's 'dynamic' would otherwise fail at the first forward.
            raise ValueError(f"unsupported rope_scaling {scaling}: only 'linear' is implemented")
        base = {name: kwargs.pop(name, getattr(type(self), name)) for name in self._BASE_FIELDS}
        super().__init__(**base, **kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


__all__ = ["DeepseekConfig"]
