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
                         **overrides)
    torch.manual_seed(0)
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return DeepSeekMoE(config, sub).cuda()


def copy_expert_weights(te_block, torch_block):
    with torch.no_grad():
        torch_block.load_state_dict(
            {k: v for k, v in te_block.state_dict().items() if "experts" not in k}, strict=False)
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(te_block.experts, name)
            for i in range(te_block.experts.num_local_experts):
                getattr(torch_block.experts, name)[i].copy_(getattr(layer, f"weight{i}"))


def test_te_backend_matches_grouped_mm_in_bf16():
    te_block, ref_block = block("te"), block("grouped_mm")
    copy_expert_weights(te_block, ref_block)
    x = torch.randn(64, 2, 128, device="cuda", dtype=torch.bfloat16)
    out_te, _ = te_block(x)
    out_ref, _ = ref_block(x)
    torch.testing.assert_close(out_te, out_ref, atol=2e-2, rtol=2e-2)


def test_te_backend_runs_under_fp8_autocast():
    from dsmoe_megatron.config import _gpu_supports_fp8

    if not _gpu_supports_fp8():
        pytest.skip("this GPU has no FP8 tensor cores")
    import transformer_engine.pytorch as te

    te_block = block("te")
    x = torch.randn(128, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with te.fp8_autocast(enabled=True):
        out, _ = te_block(x)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
