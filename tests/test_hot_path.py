"""The lean hot path: its ops against plain references, host syncs, recompute and overlap.

Each check compares with an independent computation (autograd of the plain formula, the run
without recompute, the per-token reference of test_block) or counts something the code must
not do (host syncs).
"""

import pytest
import torch
import torch.nn.functional as F

from common import aux_losses, build_chunks, make_batches, tiny_config
from dsmoe_megatron import ops, runtime
from dsmoe_megatron.profiling import HostSyncCounter, bytes_moved, saved_bytes, storage_key
from test_block import compare_with_reference, make_block


@pytest.fixture(scope="module", autouse=True)
def single_rank_runtime():
    runtime.initialize()
    yield
    runtime.shutdown()


# ---- ops --------------------------------------------------------------------------------------

def test_weighted_swiglu_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    fc1 = torch.randn(11, 12, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(11, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(11, 6, dtype=torch.float64)
    (ops.weighted_swiglu(fc1, probs) * upstream).sum().backward()
    got = fc1.grad.clone(), probs.grad.clone()
    fc1.grad = probs.grad = None
    gate, up = fc1.chunk(2, dim=-1)
    ((F.silu(gate) * up * probs[:, None]) * upstream).sum().backward()
    torch.testing.assert_close(got[0], fc1.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], probs.grad, rtol=1e-12, atol=1e-12)


def test_row_gathers_match_autograd_of_plain_indexing():
    """permute / unpermute / the EP regrouping against advanced indexing and its autograd."""
    from dsmoe_megatron import token_dispatcher as td

    torch.manual_seed(0)
    tokens, k, hidden = 9, 3, 5
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(tokens * k)
    row_of_slot = td.inverse_permutation(order)
    assert torch.equal(row_of_slot, torch.argsort(order))
    token_of_row = order // k
    rows = td.gather_rows(x, token_of_row, row_of_slot.view(tokens, k))
    shuffle = torch.randperm(tokens * k)
    moved = td.permute_rows(rows * 2, shuffle, td.inverse_permutation(shuffle))
    back = td.sum_rows(moved, td.inverse_permutation(shuffle)[row_of_slot].view(tokens, k),
                       token_of_row[shuffle])
    upstream = torch.randn(tokens, hidden, dtype=torch.float64)
    (back * upstream).sum().backward()
    got = back.detach(), x.grad.clone()

    x.grad = None
    plain = (x[token_of_row] * 2)[shuffle]
    expected = plain[td.inverse_permutation(shuffle)][row_of_slot].view(tokens, k, -1).sum(1)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(got[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], x.detach() * 2 * k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], x.grad, rtol=1e-12, atol=1e-12)


def test_block_backward_scatters_no_rows():
    """Row movement is gathers both ways: no zero-filled [rows, H] buffer and no accumulating
    index_put of rows in the backward (what autograd's backward of indexing would do)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden = 16
    block = make_block(hidden_size=hidden)
    x = torch.randn(24, 2, hidden, requires_grad=True)
    out, _ = block(x)

    class Scatters(TorchDispatchMode):
        found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            result = func(*args, **(kwargs or {}))
            wide = (isinstance(result, torch.Tensor) and result.dim() == 2
                    and result.shape[1] == hidden)
            if wide and name in ("index_put", "index_put_", "_index_put_impl_", "index_add",
                                 "index_add_", "scatter_add", "scatter_add_"):
                self.found.append(name)
            return result

    with Scatters():
        out.backward(torch.randn_like(out))
    assert Scatters.found == []
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("multiple", [16, 32])
def test_fp8_row_padding_round_trip_and_gradients(multiple):
    counts = [5, 0, 16, 33, 1]
    torch.manual_seed(0)
    rows = torch.randn(sum(counts), 8, requires_grad=True)
    probs = torch.rand(sum(counts), requires_grad=True)
    device_counts = torch.tensor(counts)
    with HostSyncCounter() as syncs:  # the index is built from the device counts
        padded, padded_probs, padded_device_counts, padded_counts, index = ops.pad_rows(
            rows, probs, device_counts, counts, multiple)
    assert syncs.events == []
    assert padded_device_counts.tolist() == padded_counts
    assert all(c % multiple == 0 and c >= n for c, n in zip(padded_counts, counts))
    assert padded.shape[0] == sum(padded_counts) == padded_probs.shape[0]
    # Each expert's rows keep their order at the start of its padded block; the rest is zero.
    start, pstart = 0, 0
    for n, c in zip(counts, padded_counts):
        assert torch.equal(padded[pstart:pstart + n], rows[start:start + n])
        assert torch.equal(padded_probs[pstart:pstart + n], probs[start:start + n])
        assert not padded[pstart + n:pstart + c].any() and not padded_probs[pstart + n:pstart + c].any()
        start, pstart = start + n, pstart + c
    back = ops.unpad_rows(padded, index)
    assert torch.equal(back, rows)
    upstream = torch.randn_like(back)
    ((back * upstream).sum() + (padded_probs * 3).sum()).backward()
    assert torch.equal(rows.grad, upstream)  # unpad(pad(x)) is the identity
    assert torch.equal(probs.grad, torch.full_like(probs, 3.0))


def test_bytes_moved_by_hand():
    x = torch.randn(4, 8)  # 128 bytes
    index = torch.tensor([0, 2, 2])  # 24 bytes
    assert bytes_moved(lambda: x * 2).other == 128 + 128
    assert bytes_moved(lambda: x.index_select(0, index)).by_op == {"index_select": 96 + 96 + 24}
    product = bytes_moved(lambda: x @ x.t())
    assert (product.gemm, product.other) == (128 + 128 + 64, 0)
    values = torch.randn(3, 8)
    scatter = bytes_moved(lambda: torch.zeros(4, 8).index_add_(0, index, values))
    assert scatter.by_op == {"zeros": 128, "index_add_": 24 + 96 + 2 * 96}
    assert scatter.row_moves == scatter.other
    assert bytes_moved(lambda: torch.empty(4, 8).view(32)).other == 0


# ---- host syncs -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,expected", [("grouped_mm", 0), ("sequential", 1)])
def test_host_syncs_per_moe_layer_at_ep1(backend, expected):
    block = make_block(moe_expert_backend=backend)
    block.train()
    x = torch.randn(8, 2, 32, requires_grad=True)
    with HostSyncCounter() as forward:
        out, _ = block(x)
    with HostSyncCounter() as backward:
        out.sum().backward()
    assert forward.count == expected, forward.events  # sequential: its host split sizes
    assert backward.count == 0, backward.events


def test_host_sync_counter_sees_each_kind():
    t = torch.tensor([1, 0, 2])
    with HostSyncCounter() as c:
        t.tolist()
        t[0].item()
        bool(t[1] > 0)
        torch.bincount(t)
        t.nonzero()
        torch.repeat_interleave(t, t)
        t[t > 0]
        torch.tensor([1, 2])  # from host data: a host-to-device copy on a GPU
        torch.as_tensor([3])
    assert c.count == 9, c.events
    with HostSyncCounter() as c:
        torch.repeat_interleave(t, t, output_size=3)
        torch.zeros(3, dtype=torch.long).scatter_add_(0, t, torch.ones_like(t))
        torch.argsort(t, stable=True)
        torch.as_tensor(t)
    assert c.count == 0, c.events


# ---- recompute --------------------------------------------------------------------------------

def _step(block, x, upstream):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out, _ = block(x)
    (out * upstream).sum().backward()
    grads = {"x": x.grad, **{n: p.grad.clone() for n, p in block.named_parameters()}}
    return out.detach(), grads, block.take_expert_load()


def _block_saved_bytes(block, x) -> int:
    x = x.clone().requires_grad_()
    _, saved = saved_bytes(lambda: block(x)[0], exclude=[x, *block.parameters()])
    return saved.total


def test_two_storages_at_one_address_are_counted_apart():
    """Recompute frees a saved output in the forward (resized to 0), and a later saved storage
    can get its address. Keyed by address, that storage was taken for the freed one and not
    counted: the planner's activation test failed or passed with the allocator's history.
    Two storages on one buffer stand for that here (the allocator does not reuse on demand)."""
    buffer = bytearray(4096)
    first, second = (torch.frombuffer(buffer, dtype=torch.float32) for _ in range(2))
    assert first.data_ptr() == second.data_ptr()
    assert storage_key(first) != storage_key(second)
    assert storage_key(first[3:]) == storage_key(first)  # a view is its storage
    x = torch.randn(1024, requires_grad=True)
    _, saved = saved_bytes(lambda: (x * first) * second, exclude=[x])  # mul saves both
    assert saved.total == 2 * 4096


SELECTIVE = [["moe_act"], ["shared_experts"], ["moe_act", "shared_experts"], ["moe"]]


def test_selective_recompute_same_gradients_less_memory():
    moe = dict(moe_aux_loss_coeff=0.01, moe_device_balance_coeff=0.02, moe_device_groups=2)
    plain = make_block(**moe).train()
    torch.manual_seed(1)
    x, upstream = torch.randn(8, 2, 32), torch.randn(8, 2, 32)
    expected = _step(plain, x, upstream)
    plain_bytes = _block_saved_bytes(plain, x)
    for modules in SELECTIVE:
        block = make_block(recompute_granularity="selective", recompute_modules=modules, **moe)
        block.load_state_dict(plain.state_dict())
        block.train()
        out, grads, load = _step(block, x, upstream)
        torch.testing.assert_close(out, expected[0], rtol=0, atol=1e-6, msg=str(modules))
        for name, grad in expected[1].items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6,
                                       msg=f"{modules}: {name}")
        assert torch.equal(load, expected[2]), modules  # counted once, not per pass
        assert _block_saved_bytes(block, x) < plain_bytes, modules


def _model_step(config, state=None):
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_moe_metrics_tracker,
    )

    [model] = build_chunks(config)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    get_moe_metrics_tracker().clear()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    batch = make_batches(1, micro_batch_size=2)[0]
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    losses.float().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    loads = [layer.mlp.take_expert_load() for layer in model.decoder.layers
             if hasattr(layer.mlp, "take_expert_load")]
    return model.state_dict(), losses.detach(), grads, loads, aux_losses()


LAYER_RECOMPUTE = {
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=1),
    "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=2),
    "full-block-3": dict(recompute_granularity="full", recompute_method="block",
                         recompute_num_layers=3),
    # Megatron's TransformerLayer checkpoints any MLP that is not its own MoELayer.
    "selective-mlp-moe_act": dict(recompute_granularity="selective",
                                  recompute_modules=["mlp", "moe_act", "core_attn"]),
}


@pytest.mark.parametrize("name", list(LAYER_RECOMPUTE))
def test_recompute_through_megatron_layers_same_gradients(name):
    state, losses, grads, loads, aux = _model_step(tiny_config())
    _, r_losses, r_grads, r_loads, r_aux = _model_step(tiny_config(**LAYER_RECOMPUTE[name]),
                                                       state)
    torch.testing.assert_close(r_losses, losses, rtol=0, atol=1e-6)
    assert grads.keys() == r_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(r_grads[name], grad, rtol=0, atol=1e-6, msg=name)
    for a, b in zip(loads, r_loads):
        assert torch.equal(a, b)  # the no-grad first pass is not counted
    assert r_aux.keys() == aux.keys() == {"load_balancing_loss"}  # logged once per layer
    for name, per_layer in aux.items():
        assert r_aux[name] == pytest.approx(per_layer, abs=1e-7)


# ---- shared-expert overlap --------------------------------------------------------------------

def test_shared_expert_overlap_runs_in_order_on_cpu_and_matches():
    block = make_block(moe_shared_expert_overlap=True, moe_aux_loss_coeff=0.0)
    assert block.side_stream is not None
    compare_with_reference(block, torch.randn(6, 3, 32))
    plain = make_block(moe_aux_loss_coeff=0.0)
    plain.load_state_dict(block.state_dict())
    x, upstream = torch.randn(6, 3, 32), torch.randn(6, 3, 32)
    out_a, grads_a, _ = _step(block.train(), x, upstream)
    out_b, grads_b, _ = _step(plain.train(), x, upstream)
    assert torch.equal(out_a, out_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


# ---- weight layout ------------------------------------------------------------------------------

def test_fused_fc1_keeps_per_projection_state_dict():
    block = make_block()
    experts = block.experts
    assert experts.gate_up_proj.shape == (8, 32, 32)  # [E, 2W, H]
    state = block.state_dict()
    names = {k for k in state if k.startswith("experts.")}
    assert names == {"experts.gate_proj", "experts.up_proj", "experts.down_proj"}
    assert state["experts.gate_proj"].shape == state["experts.up_proj"].shape == (8, 16, 32)
    assert torch.equal(state["experts.gate_proj"], experts.gate_up_proj[:, :16])
    assert torch.equal(state["experts.up_proj"], experts.gate_up_proj[:, 16:])
    # Loading per-projection tensors fills the fused weight (gate rows first).
    other = make_block()
    gate, up = torch.randn(8, 16, 32), torch.randn(8, 16, 32)
    other.load_state_dict({**state, "experts.gate_proj": gate, "experts.up_proj": up})
    assert torch.equal(other.experts.gate_up_proj, torch.cat([gate, up], dim=1))


# ---- configuration ----------------------------------------------------------------------------

def test_fusions_follow_the_machine():
    from dsmoe_megatron.config import FUSIONS, deepseek_defaults, machine_fusions

    allowed = machine_fusions()
    assert {k: deepseek_defaults()[k] for k in FUSIONS} == allowed
    # A run config written on a GPU machine (every fusion on) builds here with what runs here.
    config = tiny_config(**dict.fromkeys(FUSIONS, True))
    assert {k: getattr(config, k) for k in FUSIONS} == allowed
    if not torch.cuda.is_available():
        assert not any(allowed.values())


@pytest.mark.parametrize("fp8_store", [False, True])
def test_the_fused_expert_swiglu_keeps_its_input_as_the_config_says(fp8_store):
    """activation_func_fp8_input_store: Megatron's fused weighted SwiGLU (a GPU's
    bias_activation_fusion; it also runs here) keeps fc1's output for backward in FP8, as its
    MoE experts ask. The routed experts called it without the setting, which was ignored."""
    block = make_block()
    experts = block.experts
    experts.config.bias_activation_fusion = True  # off on a CPU machine: set by hand
    experts.config.activation_func_fp8_input_store = fp8_store
    fc1 = torch.randn(6, 2 * experts.config.moe_ffn_hidden_size, dtype=torch.bfloat16,
                      requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.dtype) or t,
                                                  lambda t: t):
        experts.activation(fc1, torch.rand(6))
    assert (torch.float8_e4m3fn in kept) == fp8_store, kept


def test_a_kernel_extension_that_fails_to_import_leaves_its_fusion_off(monkeypatch, tmp_path,
                                                                       capsys):
    """On a GPU machine, apex's fused_weight_gradient_mlp_cuda built for another torch is found
    but does not import. It counted as there: gradient_accumulation_fusion was on, and Megatron's
    ColumnParallelLinear refused to build the model ('fused_weight_gradient_mlp_cuda module is
    not found'). An extension that imports still turns its fusion on."""
    import sys

    from dsmoe_megatron import backends, config

    def fusions_with(working: tuple[str, ...], broken: str) -> dict:
        folder = tmp_path / broken
        folder.mkdir()
        (folder / f"{broken}.py").write_text("raise ImportError('undefined symbol: _ZN3c10')")
        for name in working:
            (folder / f"{name}.py").write_text("")
        with monkeypatch.context() as patch:
            patch.syspath_prepend(str(folder))
            patch.setattr(torch.cuda, "is_available", lambda: True)
            patch.setattr(backends, "te_available", lambda: False)
            config._extension_imports.cache_clear()
            try:
                return config.machine_fusions()
            finally:
                config._extension_imports.cache_clear()
                for name in (*working, broken):
                    sys.modules.pop(name, None)

    fusions = fusions_with(config._SOFTMAX_KERNELS, "fused_weight_gradient_mlp_cuda")
    assert fusions["bias_activation_fusion"] and fusions["masked_softmax_fusion"]
    assert not fusions["gradient_accumulation_fusion"]
    assert ("fused_weight_gradient_mlp_cuda is installed but `import "
            "fused_weight_gradient_mlp_cuda` fails") in capsys.readouterr().err
    # Causal attention uses the upper-triangular kernel: the fusion needs every softmax kernel.
    fusions = fusions_with(("scaled_masked_softmax_cuda", "scaled_softmax_cuda"),
                           "scaled_upper_triang_masked_softmax_cuda")
    assert not fusions["masked_softmax_fusion"]


def test_plain_silu_mlp_runs_without_the_swiglu_fusion(monkeypatch):
    """A dense model without gated_linear_unit on a GPU machine: Megatron's MLP fuses silu only
    as SwiGLU and raised at the first forward; the fusion stays off for it."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    from dsmoe_megatron import config

    fusions = config.machine_fusions()
    monkeypatch.setattr(config, "machine_fusions",
                        lambda: {**fusions, "bias_activation_fusion": True})
    assert tiny_config(moe=False).bias_activation_fusion  # SwiGLU keeps it
    plain = tiny_config(moe=False, gated_linear_unit=False)
    assert not plain.bias_activation_fusion
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    out, _ = MLP(plain, sub)(torch.randn(4, 2, 32))
    assert out.shape == (4, 2, 32)


def test_router_padding_for_fp8_is_refused_with_the_reason():
    from dsmoe_megatron.config import ConfigError

    for key in ("moe_router_padding_for_fp8", "moe_router_padding_for_quantization"):
        with pytest.raises(ConfigError, match="pad each expert's rows for FP8 themselves"):
            tiny_config(**{key: True})


def test_te_experts_recomputing_the_activation_under_fp8_keep_it_unquantized(monkeypatch):
    """With recompute_modules moe_act under FP8 / FP4, Transformer Engine's fc2 kept its own
    quantized copy of the SwiGLU output, which the recompute then drops and remakes for nothing:
    fc2 must keep the original (set_save_original_input), as Megatron's TEGroupedMLP does.
    Transformer Engine's grouped linears are stand-ins (one weight per expert)."""
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.process_groups_config import ProcessGroupCollection

    from dsmoe_megatron.experts import TEGroupedExperts

    class GroupedLinear(torch.nn.Module):
        def __init__(self, num_gemms, input_size, output_size, **kwargs):
            super().__init__()
            for i in range(num_gemms):
                self.register_parameter(f"weight{i}",
                                        torch.nn.Parameter(torch.zeros(output_size, input_size)))
            self.save_original_input = False

    kept = []

    def set_save_original_input(module):
        module.save_original_input = True
        kept.append(module)

    for name in ("TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear"):
        monkeypatch.setattr(te_extension, name, GroupedLinear, raising=False)
    monkeypatch.setattr(te_extension, "set_save_original_input", set_save_original_input)
    for recompute, quantized in ((["moe_act"], True), (["moe_act"], False), (["core_attn"], True)):
        cfg = tiny_config(recompute_granularity="selective", recompute_modules=recompute)
        cfg.fp8 = "hybrid" if quantized else None  # after the config's checks: no TE here
        kept.clear()
        routed = TEGroupedExperts(cfg, ProcessGroupCollection.use_mpu_process_groups())
        expected = [routed.down_proj] if quantized and recompute == ["moe_act"] else []
        assert kept == expected, (recompute, quantized)
