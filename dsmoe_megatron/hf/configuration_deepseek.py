"""Configuration of DeepSeekMoE models in the layout of the released ``deepseek-moe-16b-base`` checkpoint.

This file is also shipped as Hugging Face remote code next to exported weights, so it may import only
``transformers``.
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
    being folded into transformers 5's ``rope_parameters``.
    """

    model_type = "deepseek"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    num_experts_per_tok: int | None = 6
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int = 1  # in the released config.json; unused here
    tie_word_embeddings: bool = False
    # Declaring these as fields shadows PretrainedConfig's deprecated `rope_scaling` property.
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.scoring_func != "softmax":
            raise ValueError(f"unsupported scoring_func {self.scoring_func!r}: only 'softmax' is implemented")
        super().__post_init__(**kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


__all__ = ["DeepseekConfig"]
