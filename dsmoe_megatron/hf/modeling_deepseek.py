"""DeepSeekMoE for transformers 5.x, with the state-dict layout of the released ``deepseek-moe-16b-base``.

This file is shipped as Hugging Face remote code next to exported weights and loaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, so it may import only ``torch``,
``transformers`` and its sibling configuration module (relatively).
"""

from dataclasses import dataclass, fields
from functools import cache as memoize, partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast
from transformers.utils import can_return_tuple

from .configuration_deepseek import DeepseekConfig

# transformers 5.24 renamed the generation cache `past_key_values` -> `cache`: `generate` passes it to `forward`
# and reads it back from the output under the new name. The forward methods take either name and return the
# cache under the field the installed version's output classes declare.
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(MoeCausalLMOutputWithPast)} else "past_key_values"
# Passed by `generate` and ignored: `cache_position` (before 5.24; the past length comes from the cache itself) and
# `tokenizer` (given for `stop_strings`, which greedy, sampling and beam search hand on to the forward).
IGNORED_GENERATE_KWARGS = ("cache_position", "tokenizer")
# Passed by transformers' Trainer to a forward that takes **kwargs (the label tokens of the whole
# accumulated batch, for the loss of each micro-batch).
LOSS_KWARGS = ("num_items_in_batch",)


def resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as either `cache` or `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def check_extra_kwargs(owner: str, kwargs: dict) -> None:
    """Refuse keyword arguments this model does not implement instead of silently ignoring them."""
    unknown = sorted(k for k in kwargs if k not in IGNORED_GENERATE_KWARGS + LOSS_KWARGS)
    if unknown:
        raise TypeError(f"{owner}.forward() got unexpected keyword argument(s): {', '.join(unknown)}")


class DeepseekRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(config: DeepseekConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [batch, seq, head_dim] for the half-split ("rotate_half") rotary embedding."""
    head_dim = config.hidden_size // config.num_attention_heads
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    positions = position_ids.float()
    scaling = config.rope_scaling
    if scaling:  # linear (DeepseekConfig refuses the others)
        positions = positions / scaling["factor"]
    freqs = positions[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def build_attention_bias(
    attention_mask: torch.Tensor | None,
    query_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
    sequence_ids: torch.Tensor | None,
    key_len: int,
) -> torch.Tensor | None:
    """Additive [batch|1, 1, query, key] bias from causality and a [batch, key] padding mask (1 = real token).

    ``key_len`` is the length of the keys the cache returns: past + query for a DynamicCache, the whole
    preallocated buffer for a StaticCache (whose unfilled tail causality masks). ``sequence_ids`` [batch, query]
    (see ``packed_sequence_ids``): a token attends only to the tokens of its own sequence. None means plain causal
    attention. A 4D mask is used as given (a boolean one, True = attend, made additive). Masked entries get the
    dtype's minimum instead of -inf so that all-padding query rows (left-padded prompts) stay finite, not NaN.
    """
    min_value = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:
            return attention_mask
        return torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(~attention_mask, min_value)
    if attention_mask is None and past_len == 0 and sequence_ids is None:
        return None
    query_pos = torch.arange(past_len, past_len + query_len, device=device)[:, None]
    key_pos = torch.arange(key_len, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None]
    if sequence_ids is not None:  # the keys past the query are masked by causality: any id will do
        key_ids = F.pad(sequence_ids, (0, key_len - query_len), value=-1)
        allowed = allowed & (sequence_ids[:, None, :, None] == key_ids[:, None, None, :])
    if attention_mask is not None:
        if attention_mask.shape[-1] > key_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache holds {key_len}"
            )
        padding = F.pad(attention_mask.bool(), (0, key_len - attention_mask.shape[-1]))
        allowed = allowed & padding[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, min_value)


def packed_sequence_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """For rows packing several sequences, as transformers' ``DataCollatorWithFlattening`` packs them (no attention
    mask, the positions restarting at each sequence), the [batch, seq] index of each token's sequence; None when
    each row is one sequence. transformers' own models detect packing the same way."""
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    return starts.cumsum(-1) if starts[:, 1:].any() else None


class DeepseekAttention(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, attention_bias, cache: Cache | None, cache_position: torch.Tensor,
                output_attentions: bool = False):
        """The output and, with ``output_attentions``, the attention weights [batch, heads, query, key] (else None).

        ``attention_bias(key_len)`` gives the additive mask for the keys this step attends to;
        ``cache_position`` the cache slots the new keys go to (StaticCache before transformers 5.24 needs them)."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": cache_position})
        bias = attention_bias(k.shape[-2])
        if output_attentions:
            out, weights = self.eager_attention(q, k, v, bias)
            return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), weights
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=bias is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), None

    def eager_attention(self, q, k, v, bias):
        """Attention with its weights, which SDPA does not return (softmax in float32, as the released code)."""
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5
        if bias is None:  # plain causal attention: query i sees keys 0..i
            bias = torch.full(scores.shape[-2:], torch.finfo(scores.dtype).min, dtype=scores.dtype,
                              device=q.device).triu(1)
        weights = (scores + bias).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = F.dropout(weights, p=self.dropout, training=self.training) @ v
        return out, weights


class DeepseekMLP(nn.Module):
    def __init__(self, config: DeepseekConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekRouter(nn.Linear):
    """The router's logits, in float32: the released code computed them in the model dtype, which in bf16 can
    flip the choice between near-tied experts. Called as a module, so that hooks on it run (accelerate's
    offloading loads its weight then; a LoRA adapter on it applies)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__(config.hidden_size, config.n_routed_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class DeepseekMoE(nn.Module):
    """Softmax top-k routed experts plus always-on shared experts, and in training mode the released code's
    expert-level balance loss."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.gate = DeepseekRouter(config)
        self.experts = nn.ModuleList(
            DeepseekMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            DeepseekMLP(config, config.n_shared_experts * config.moe_intermediate_size)
            if config.n_shared_experts
            else None
        )

    def route(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (weights, expert ids) per token, both [tokens, top_k], from the router probabilities."""
        weights, expert_ids = scores.topk(self.top_k, dim=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights, expert_ids

    def balance_loss(self, scores: torch.Tensor, expert_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """``aux_loss_alpha * sum_i f_i P_i`` with ``f_i = N' / (K' T) * #tokens choosing i`` and ``P_i`` the
        mean probability of expert i, over each sequence (``seq_aux``, averaged) or the whole batch, as the
        released training code computes it (padding tokens count)."""
        groups = batch if self.seq_aux else 1
        scores = scores.view(groups, -1, scores.shape[-1])
        chosen = expert_ids.reshape(groups, -1)
        counts = torch.zeros_like(scores[:, 0]).scatter_add_(1, chosen, torch.ones_like(chosen, dtype=scores.dtype))
        f = counts * (scores.shape[-1] / chosen.shape[1])
        return self.aux_loss_alpha * (f * scores.mean(dim=1)).sum(dim=-1).mean()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MoE output and, in training mode with ``aux_loss_alpha > 0``, its balance loss (else None)."""
        tokens = x.reshape(-1, x.shape[-1])
        scores = self.gate(tokens).softmax(dim=-1)
        weights, expert_ids = self.route(scores)
        routed = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        for expert_id, expert in enumerate(self.experts):
            token_idx, slot = torch.where(expert_ids == expert_id)
            if token_idx.numel() == 0:
                continue
            expert_out = expert(tokens[token_idx]).float() * weights[token_idx, slot, None]
            routed.index_add_(0, token_idx, expert_out)
        out = routed.to(x.dtype).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        aux_loss = None
        if self.training and self.aux_loss_alpha > 0:
            aux_loss = self.balance_loss(scores, expert_ids, x.shape[0])
        return out, aux_loss


class DeepseekDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DeepseekAttention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = DeepseekMoE(config) if self.is_moe else DeepseekMLP(config, config.intermediate_size)
        self.input_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, attention_bias, cache, cache_position, output_attentions=False):
        """The layer's output, its balance loss (None in dense layers and outside training) and its attention
        weights (None without ``output_attentions``)."""
        attention, weights = self.self_attn(self.input_layernorm(hidden), cos, sin, attention_bias, cache,
                                            cache_position, output_attentions)
        hidden = hidden + attention
        mlp_input = self.post_attention_layernorm(hidden)
        out, aux_loss = self.mlp(mlp_input) if self.is_moe else (self.mlp(mlp_input), None)
        return hidden + out, aux_loss, weights


@dataclass
class DeepseekModelOutputWithPast(BaseModelOutputWithPast):
    """``aux_loss``: the balance losses of all MoE layers summed (training mode only)."""

    aux_loss: torch.FloatTensor | None = None


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeepseekDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DeepseekRMSNorm):
            init.ones_(module.weight)


class DeepseekModel(DeepseekPreTrainedModel):
    def __init__(self, config: DeepseekConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> DeepseekModelOutputWithPast:
        """``cache`` (or its pre-5.24 name ``past_key_values``) is updated in place and returned."""
        check_extra_kwargs(type(self).__name__, kwargs)
        cache = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:  # e.g. from_pretrained(..., output_hidden_states=True)
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a recomputed layer would append its keys to the cache twice
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        past_len = int(cache.get_seq_length()) if cache is not None else 0
        batch, seq = hidden.shape[:2]

        cache_position = torch.arange(past_len, past_len + seq, device=hidden.device)
        sequence_ids = None
        if position_ids is None:
            position_ids = cache_position.expand(batch, -1)
        elif attention_mask is None and past_len == 0:
            sequence_ids = packed_sequence_ids(position_ids.expand(batch, -1))
        cos, sin = rotary_cos_sin(self.config, position_ids, hidden.dtype)
        # Built once per key length (all layers share it) when the first layer knows it.
        attention_bias = memoize(
            partial(build_attention_bias, attention_mask, seq, past_len, hidden.dtype, hidden.device, sequence_ids)
        )

        all_hidden = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        aux_losses = []
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden)
            hidden, aux_loss, weights = layer(hidden, cos, sin, attention_bias, cache, cache_position,
                                              output_attentions)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
            if all_attentions is not None:
                all_attentions.append(weights)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return DeepseekModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attentions) if all_attentions is not None else None,
            aux_loss=torch.stack(aux_losses).sum() if aux_losses else None,
            **{CACHE_FIELD: cache},
        )


class DeepseekForCausalLM(DeepseekPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekConfig):
        super().__init__(config)
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    def get_decoder(self) -> DeepseekModel:
        return self.model

    def set_decoder(self, decoder: DeepseekModel):
        self.model = decoder

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """``cache`` (or its pre-5.24 name ``past_key_values``) is updated in place and returned.

        In training mode ``aux_loss`` is the layers' balance loss, and ``loss`` (given ``labels``) includes it,
        weighted as the language-model loss is: by this batch's share of ``num_items_in_batch`` label tokens
        when the Trainer passes that (gradient accumulation), so each optimizer step sees it once.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        check_extra_kwargs(type(self).__name__, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,  # read by name below, whatever config.return_dict says
        )
        # The last `logits_to_keep` positions (0: all), or a 1D tensor of the positions to keep, as in
        # transformers' own models. float32 logits, as the released code returned.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep]).float()
        loss, aux_loss = None, outputs.aux_loss
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch)
            if aux_loss is not None:
                share = 1.0
                if num_items_in_batch is not None:  # the label tokens the loss function counts
                    share = (labels[:, 1:] != -100).sum() / num_items_in_batch
                loss = loss + share * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


__all__ = ["DeepseekForCausalLM", "DeepseekModel", "DeepseekPreTrainedModel"]
