"""The DeepSeekMoE block against an independent per-token reference, on every CPU backend."""

import pytest
import torch

from common import grads_of, reference_block, tiny_config
from dsmoe_megatron import runtime
from dsmoe_megatron.router import balance_losses

BACKENDS = ["sequential", "grouped_mm"]


@pytest.fixture(scope="module", autouse=True)
def single_rank_runtime():
    runtime.initialize()
    yield
    runtime.shutdown()


def make_block(**overrides):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from dsmoe_megatron.moe import DeepSeekMoE

    config = tiny_config(**overrides)
    torch.manual_seed(0)
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return DeepSeekMoE(config, sub)


def compare_with_reference(block, x):
    block.train()
    upstream = torch.randn_like(x)
    x1 = x.clone().requires_grad_()
    out, bias = block(x1)
    assert bias is None
    (out * upstream).sum().backward()
    got = grads_of(block, x1)
    block.zero_grad()
    x2 = x.clone().requires_grad_()
    expected_out = reference_block(block, x2)
    (expected_out * upstream).sum().backward()
    expected = grads_of(block, x2)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("renormalise", [False, True], ids=["deepseek", "renormalised"])
def test_block_matches_per_token_reference(backend, renormalise):
    # No balance loss here: its gradient is checked on its own below.
    block = make_block(moe_expert_backend=backend, moe_router_pre_softmax=not renormalise,
                       moe_aux_loss_coeff=0.0)
    x = torch.randn(6, 3, 32)
    compare_with_reference(block, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_with_zero_tokens_and_all_tokens_on_one_expert(backend):
    block = make_block(moe_expert_backend=backend, moe_aux_loss_coeff=0.0)
    x = torch.rand(5, 2, 32) + 0.1  # positive inputs
    with torch.no_grad():
        block.router.weight.copy_(-torch.ones_like(block.router.weight))
        block.router.weight[:3] = 1.0  # experts 0-2 win for every token, 3-7 get none
    rows = block.router(x).expert_idx
    assert set(rows.unique().tolist()) == {0, 1, 2}
    compare_with_reference(block, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_shared_experts_and_unaligned_widths(backend):
    # Width 10 and hidden 34 break grouped_mm's 16-byte stride rule in fp32: padding kicks in.
    block = make_block(moe_expert_backend=backend, moe_num_shared_experts=0,
                       moe_ffn_hidden_size=10, hidden_size=34, num_attention_heads=2,
                       moe_aux_loss_coeff=0.0)
    assert block.shared_experts is None
    compare_with_reference(block, torch.randn(4, 2, 34))


# ---- balance losses against a hand computation -------------------------------------------

# 2 sequences x 2 positions = 4 tokens, 4 experts, top-2. Token order is [S, B] flattened:
# t0 = (s0, b0), t1 = (s0, b1), t2 = (s1, b0), t3 = (s1, b1).
PROBS = torch.tensor([
    [0.4, 0.3, 0.2, 0.1],
    [0.1, 0.2, 0.3, 0.4],
    [0.5, 0.1, 0.3, 0.1],
    [0.25, 0.25, 0.25, 0.25],
])
CHOSEN = torch.tensor([[0, 1], [3, 2], [0, 2], [1, 2]])


def test_balance_losses_per_batch_by_hand():
    # counts = [2, 2, 3, 1]; f_i = N/(K T) * count = 4/(2*4) * count = [1, 1, 1.5, 0.5]
    # P = column means = [1.25, 0.85, 1.05, 0.85] / 4
    f = [1.0, 1.0, 1.5, 0.5]
    p = [1.25 / 4, 0.85 / 4, 1.05 / 4, 0.85 / 4]
    expected_expert = sum(fi * pi for fi, pi in zip(f, p))
    # two device groups {0,1}, {2,3}: f' = [1.0, 1.0], P' = [2.10/4, 1.90/4]
    expected_device = 1.0 * 2.10 / 4 + 1.0 * 1.90 / 4
    expert, device = balance_losses(PROBS, CHOSEN, num_sequences=2, per_sequence=False,
                                    num_groups=2)
    assert expert.item() == pytest.approx(expected_expert, abs=1e-6)
    assert device.item() == pytest.approx(expected_device, abs=1e-6)


def test_balance_losses_per_sequence_by_hand():
    # Sequence b0 = tokens t0, t2: counts [2, 1, 1, 0], f = 4/(2*2) * counts = counts,
    #   P = ([0.4,0.3,0.2,0.1] + [0.5,0.1,0.3,0.1]) / 2 = [0.45, 0.2, 0.25, 0.1]
    # Sequence b1 = tokens t1, t3: counts [0, 1, 2, 1],
    #   P = ([0.1,0.2,0.3,0.4] + [0.25]*4) / 2 = [0.175, 0.225, 0.275, 0.325]
    e0 = 2 * 0.45 + 1 * 0.2 + 1 * 0.25 + 0
    e1 = 0 + 1 * 0.225 + 2 * 0.275 + 1 * 0.325
    # device groups {0,1}, {2,3}: b0: f' = [1.5, 0.5], P' = [0.65, 0.35]
    #                              b1: f' = [0.5, 1.5], P' = [0.4, 0.6]
    d0 = 1.5 * 0.65 + 0.5 * 0.35
    d1 = 0.5 * 0.4 + 1.5 * 0.6
    expert, device = balance_losses(PROBS, CHOSEN, num_sequences=2, per_sequence=True,
                                    num_groups=2)
    assert expert.item() == pytest.approx((e0 + e1) / 2, abs=1e-6)
    assert device.item() == pytest.approx((d0 + d1) / 2, abs=1e-6)


@pytest.mark.parametrize("mode", ["aux_loss", "seq_aux_loss"])
def test_balance_loss_gradient_reaches_router_only(mode):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    block = make_block(moe_router_load_balancing_type=mode, moe_aux_loss_coeff=0.1,
                       moe_device_balance_coeff=0.05, moe_device_groups=2)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = torch.randn(6, 3, 32)
    out, _ = block(x)
    (out * 0.0).sum().backward()  # only the balance losses carry gradient
    assert block.router.weight.grad.abs().sum() > 0
    for name, param in block.named_parameters():
        if name != "router.weight":
            assert param.grad is None or param.grad.abs().sum() == 0, name
    # And the router gradient is exactly that of a1 * L_exp + a2 * L_dev computed directly.
    w = block.router.weight.detach().clone().requires_grad_()
    probs = torch.softmax(x.reshape(-1, 32) @ w.t(), dim=-1)
    chosen = torch.topk(probs, 3).indices
    expert, device = balance_losses(probs, chosen, 3, mode == "seq_aux_loss", 2)
    (0.1 * expert + 0.05 * device).backward()
    torch.testing.assert_close(block.router.weight.grad, w.grad, atol=1e-6, rtol=1e-5)
