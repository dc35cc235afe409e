"""The model provider shared by every trainer: DeepSeekMoEConfig -> Megatron-core GPTModel."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.utils import get_pg_rank

from dsmoe_megatron.config import DeepSeekMoEConfig
from dsmoe_megatron.specs import get_dsmoe_block_spec


VOCAB_PAD_MULTIPLE = 1024


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int = 1) -> int:
    """Pad the vocabulary to a multiple of 1024 (= 128 x TP 8), independent of the layout, so a
    checkpoint resumes under any TP size that divides 1024."""
    if VOCAB_PAD_MULTIPLE % tensor_parallel_size:
        raise ValueError(
            f"tensor_model_parallel_size={tensor_parallel_size} must divide {VOCAB_PAD_MULTIPLE} "
            "(the vocabulary padding)"
        )
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def build_model(config: DeepSeekMoEConfig, vocab_size: int, max_sequence_length: int,
                pre_process: bool | None = None, post_process: bool | None = None,
                vp_stage: int | None = None, pg_collection=None,
                use_te: bool | None = None, real_vocab_size: int | None = None) -> GPTModel:
    """GPTModel (RoPE of base ``config.rotary_base``, untied embeddings) for this rank's
    pipeline stage / virtual stage.
    ``vocab_size`` is the padded vocabulary; with ``real_vocab_size`` the padding rows' logits
    are masked (``mask_vocabulary_padding``). ``use_te``: Transformer Engine modules (default:
    where TE imports)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_dsmoe_block_spec(config, vp_stage=vp_stage, use_te=use_te),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=config.rotary_base,
        vp_stage=vp_stage,
        **kwargs,
    )
    if post_process and real_vocab_size is not None and real_vocab_size < vocab_size:
        mask_vocabulary_padding(model.output_layer, real_vocab_size)
    return model


def mask_vocabulary_padding(output_layer, real_vocab_size: int) -> None:
    """Give the padding rows of the (vocabulary-parallel) output layer the lowest logit.

    Megatron's loss is a softmax over every row of the padded vocabulary, so padding rows took
    probability: the loss was not the model's loss over its vocabulary (what Hugging Face and
    dsmoe-analyze compute), and a model imported from Hugging Face (zero padding rows, logit 0)
    started well above it. Masked, they get no probability and no gradient."""
    per_rank = output_layer.output_size_per_partition
    first = get_pg_rank(output_layer.tp_group) * per_rank

    def mask(module, args, output):
        logits, bias = output
        start = first if logits.shape[-1] == per_rank else 0  # else gathered: the whole row
        if start + logits.shape[-1] <= real_vocab_size:
            return output
        padding = torch.arange(start, start + logits.shape[-1], device=logits.device)
        return logits.masked_fill(padding >= real_vocab_size, torch.finfo(logits.dtype).min), bias

    output_layer.register_forward_hook(mask)


def build_model_chunks(config: DeepSeekMoEConfig, vocab_size: int, max_sequence_length: int,
                       real_vocab_size: int | None = None) -> list[GPTModel]:
    """This rank's model: one chunk, or one per virtual pipeline stage (interleaved schedule)."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    return [build_model(config, vocab_size, max_sequence_length, vp_stage=s,
                        real_vocab_size=real_vocab_size) for s in stages]


def model_provider(config: DeepSeekMoEConfig, vocab_size: int, max_sequence_length: int):
    """A `model_provider(pre_process, post_process, vp_stage=None)` closure for Megatron loops."""

    def provide(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                **_unused):
        return build_model(config, vocab_size, max_sequence_length, pre_process, post_process,
                           vp_stage)

    return provide
