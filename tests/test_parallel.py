"""Every parallel layout reproduces the single-rank run: losses, balance losses, gradients.

A tiny model (4 layers, first dense, 8 routed + 1 shared experts, top-3, both balance losses)
starts from one saved set of weights; each layout runs the same 4 micro-batches through
Megatron's schedules and DDP, and its gradients are gathered to full tensors through dist
checkpointing and compared with the single-rank run's.
"""

import pytest

from common import max_differences
from distributed import run_on_ranks
from dsmoe_megatron.runtime import ParallelLayout
from parallel_cases import count_host_syncs, resave, single_rank_reference, train_step

pytestmark = pytest.mark.distributed

MOE = {"moe_aux_loss_coeff": 0.01, "moe_device_balance_coeff": 0.05, "moe_device_groups": 2}
MICROBATCHES = 4
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return root, single_rank_reference(root, MOE, MICROBATCHES)


def combined_aux(results):
    """Sum each balance loss over layers and data-parallel ranks (one TP rank per group)."""
    totals = {}
    for r in results:
        if r["tp_rank"] != 0:
            continue
        for name, per_layer in r["aux"].items():
            totals[name] = totals.get(name, 0.0) + sum(per_layer)
    return totals


def combined_losses(results, layout):
    """Per-microbatch losses in the single-rank order (DP rank r ran micro-batches r, r+DP...)."""
    last = [r for r in results if r["pp_rank"] == layout.pipeline - 1 and r["tp_rank"] == 0]
    dp = len(last)
    losses = [None] * MICROBATCHES
    for r in last:
        losses[r["dp_rank"]::dp] = r["losses"]
    return losses


LAYOUTS = {
    "tp2": (2, ParallelLayout(tensor=2)),
    "tp2-sp": (2, ParallelLayout(tensor=2, sequence_parallel=True)),
    "tp2-etp1": (2, ParallelLayout(tensor=2, expert_tensor=1)),
    "ep2": (2, ParallelLayout(expert=2)),
    "ep4": (4, ParallelLayout(expert=4)),
    "pp2-1f1b": (2, ParallelLayout(pipeline=2)),
    "pp2-interleaved": (2, ParallelLayout(pipeline=2, virtual_pipeline=2)),
    "dp2": (2, ParallelLayout()),
    "dp2xep2": (4, ParallelLayout(expert=2)),
    "tp2xep2-sp": (4, ParallelLayout(tensor=2, expert=2, expert_tensor=1, sequence_parallel=True)),
    "pp2xep2": (4, ParallelLayout(pipeline=2, expert=2)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(reference, name, tmp_path):
    root, single = reference
    world, layout = LAYOUTS[name]
    results = run_on_ranks(train_step, world, layout=layout,
                           args=(layout, MOE, str(root / "init"), str(tmp_path), MICROBATCHES))
    assert combined_losses(results, layout) == pytest.approx(single["losses"], abs=TOL)
    expected_aux = combined_aux([single])
    assert set(expected_aux) == {"load_balancing_loss", "device_balance_loss"}
    assert combined_aux(results) == pytest.approx(expected_aux, abs=TOL)
    diffs = max_differences(root / "grads", tmp_path)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"gradient of {worst} differs by {diffs[worst]:.2e}"


def test_distributed_optimizer_step_matches_single_rank(reference, tmp_path):
    root, _ = reference
    run_on_ranks(train_step, 1, args=(ParallelLayout(), MOE, str(root / "init"),
                                      str(tmp_path / "single"), MICROBATCHES, "adam"))
    layout = ParallelLayout(expert=2)
    run_on_ranks(train_step, 4, layout=layout,
                 args=(layout, MOE, str(root / "init"), str(tmp_path / "dp2xep2"), MICROBATCHES,
                       "distributed-adam"))
    diffs = max_differences(tmp_path / "single", tmp_path / "dp2xep2")
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"weight {worst} differs by {diffs[worst]:.2e} after one step"
    moved = max_differences(root / "init", tmp_path / "single")
    assert min(moved.values()) > 0, "the optimizer step changed nothing"


def test_checkpoint_saved_under_ep2_loads_under_ep4_and_ep1(reference, tmp_path):
    root, single = reference
    ep2 = ParallelLayout(expert=2)
    run_on_ranks(resave, 2, layout=ep2, args=(ep2, MOE, str(root / "init"), str(tmp_path / "ep2")))
    for world, layout in [(4, ParallelLayout(expert=4)), (1, ParallelLayout())]:
        results = run_on_ranks(train_step, world, layout=layout,
                               args=(layout, MOE, str(tmp_path / "ep2"), str(tmp_path / "g"),
                                     MICROBATCHES))
        assert combined_losses(results, layout) == pytest.approx(single["losses"], abs=TOL)


def test_one_host_sync_per_moe_layer_under_ep2():
    # The all-to-all split sizes (with the per-expert counts for host-count backends riding on
    # the same copy); nothing in backward.
    layout = ParallelLayout(expert=2)
    for rank in run_on_ranks(count_host_syncs, 2, layout=layout, args=(layout,)):
        for backend, (forward, backward) in rank.items():
            assert forward == ["Tensor.tolist"], (backend, forward)
            assert backward == [], (backend, backward)
