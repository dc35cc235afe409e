"""Pretrain DeepSeekMoE with Megatron-LM's training loop: a drop-in for pretrain_gpt.py.

Takes Megatron-LM's flags, the DeepSeekMoE ones (--moe-num-shared-experts, --moe-first-k-dense,
--moe-device-balance-coeff, --moe-device-groups, --moe-expert-backend) and a YAML run config
(--dsmoe-yaml; flags given explicitly win). Without --data-path it trains on the corpus shipped
with dsmoe_megatron (byte-level tokens).

    # GPU
    torchrun --nproc-per-node 8 examples/pretrain_dsmoe_megatron_lm.py \\
        --dsmoe-yaml yaml_configs/deepseekmoe_16b.yaml --lr-decay-style cosine --save ckpt \\
        --save-interval 1000
    # CPU (gloo; the CPU shim and flags are applied automatically)
    torchrun --nproc-per-node 1 examples/pretrain_dsmoe_megatron_lm.py \\
        --dsmoe-yaml yaml_configs/tiny.yaml --train-iters 40
"""

from dsmoe_megatron import megatron_lm


def main() -> None:
    megatron_lm.enable_cpu_training()  # no-op with CUDA
    megatron_lm.hook_checkpoint_loading()
    megatron_lm.log_dsmoe_balance_losses()

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    args = megatron_lm.parse_and_validate_args(default_flags=megatron_lm.EXAMPLE_FLAGS)
    pretrain(
        pretrain_cfg_container_from_args(args),
        megatron_lm.train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        megatron_lm.forward_step,
        model_provider=megatron_lm.model_provider,
    )


if __name__ == "__main__":
    main()
