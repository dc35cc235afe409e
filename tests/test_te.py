"""Transformer Engine backend: runs only where TE imports (a CUDA machine); skipped elsewhere."""

import pytest
import torch

from dsmoe_megatron.backends import te_available

pytestmark = [
    pytest.mark.te,
    pytest.mark.skipif(not te_available(), reason="Transformer Engine does not import here (no GPU/TE)"),
]


@pytest.fixture(scope="module", autouse=True)
def single_rank_runtime():
    from dsmoe_megatron import runtime

    runtime.initialize()
    yield
    runtime.shutdown()


def block(backend, **overrides):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from common import tiny_config
    from dsmoe_megatron.moe import DeepSeekMoE

    config = tiny_config(moe_expert_backend=backend, params_dtype=torch.bfloat16, bf16=True,
                         hidden_size=128, moe_ffn_hidden_size=64, moe_aux_loss_coeff=0.0,
                         # no Megatron DDP here to provide main_grad
                         gradient_accumulation_fusion=False, **overrides)
    torch.manual_seed(0)
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return DeepSeekMoE(config, sub).cuda()


def copy_weights(te_block, torch_block):
    """Everything but the routed experts by name (router, shared experts), the experts from
    TE's per-expert weights into the [E, ...] tensors."""
    with torch.no_grad():
        rest = {k: v for k, v in te_block.state_dict().items()
                if not k.startswith("experts.") and not k.endswith("_extra_state")}
        missing, unexpected = torch_block.load_state_dict(rest, strict=False)
        assert not unexpected and all(k.startswith("experts.") for k in missing), missing
        for name in ("gate_up_proj", "down_proj"):
            layer = getattr(te_block.experts, name)
            for i in range(te_block.experts.num_local_experts):
                getattr(torch_block.experts, name)[i].copy_(getattr(layer, f"weight{i}"))


@pytest.mark.parametrize("permute_fusion", [False, True])
def test_te_backend_matches_grouped_mm_in_bf16(permute_fusion):
    te_block = block("te", moe_permute_fusion=permute_fusion)
    ref_block = block("grouped_mm", moe_permute_fusion=False)
    copy_weights(te_block, ref_block)
    x = torch.randn(64, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out_te, _ = te_block(x)
    out_ref, _ = ref_block(x)
    torch.testing.assert_close(out_te, out_ref, atol=2e-2, rtol=2e-2)


def test_te_backend_fp8_step_with_padded_expert_rows():
    from dsmoe_megatron.config import _gpu_supports_fp8

    if not _gpu_supports_fp8():
        pytest.skip("this GPU has no FP8 tensor cores")
    from megatron.core.fp8_utils import get_fp8_context

    te_block = block("te", fp8="hybrid")
    assert te_block.experts.pad_multiple in (16, 32)
    # 128 x 2 tokens, top-3 of 8 experts: per-expert row counts are not multiples of 16.
    x = torch.randn(128, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    # The config's recipe, as Megatron's TransformerBlock enters it: TE's default recipe is
    # MXFP8 on Blackwell, whose 32-row alignment the delayed recipe's padding (16) misses.
    with get_fp8_context(te_block.config):
        out, _ = te_block(x)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert te_block.experts.gate_up_proj.weight0.grad is not None
    # Each expert's FP8 scaling state is saved with it.
    state = te_block.sharded_state_dict()
    extra = [k for k in state if k.startswith("experts.") and "_extra_state" in k]
    assert len(extra) == 2 * te_block.experts.num_local_experts, extra
