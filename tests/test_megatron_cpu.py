"""Megatron-core's GPTModel on CPU through the runtime: single rank, TP=2 and PP=2 (1F1B)."""

import pytest

from distributed import run_on_ranks
from dsmoe_megatron.runtime import ParallelLayout
from parallel_cases import padded_vocabulary_loss, single_rank_reference, train_step

DENSE = {"num_moe_experts": None, "moe_router_topk": 2, "moe_ffn_hidden_size": None,
         "moe_num_shared_experts": 0, "moe_first_k_dense": 0}
MICROBATCHES = 4


@pytest.fixture(scope="module")
def dense_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return root, single_rank_reference(root, DENSE, MICROBATCHES)


@pytest.mark.distributed
def test_single_rank_forward_backward_on_cpu(dense_reference):
    _, single = dense_reference
    assert len(single["losses"]) == MICROBATCHES
    # Random tokens over a 128 vocabulary: the loss of a fresh model is close to ln(128).
    assert all(4.0 < loss < 5.5 for loss in single["losses"])


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [ParallelLayout(tensor=2), ParallelLayout(pipeline=2), ParallelLayout(pipeline=2, virtual_pipeline=2)],
                         ids=["tp2", "pp2-1f1b", "pp2-vpp"])
def test_layout_matches_single_rank(dense_reference, layout, tmp_path):
    root, single = dense_reference
    results = run_on_ranks(train_step, 2, layout=layout,
                           args=(layout, DENSE, str(root / "init"), str(tmp_path), MICROBATCHES))
    last_stage = [r for r in results if r["pp_rank"] == layout.pipeline - 1]
    for r in last_stage:
        assert r["losses"] == pytest.approx(single["losses"], abs=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_vocabulary_padding_takes_no_probability(tp):
    """The loss is the cross-entropy over the real vocabulary (on every TP size), and the
    padding rows of the output layer get no gradient."""
    import torch

    results = run_on_ranks(padded_vocabulary_loss, tp, layout=ParallelLayout(tensor=tp),
                           args=(ParallelLayout(tensor=tp),))
    for r in results:
        torch.testing.assert_close(r["loss"], r["reference"], rtol=1e-5, atol=1e-6)
        assert r["padding_grad"] == 0
    assert sum(r["real_grad"] for r in results) > 0  # TP2: rank 1 holds only padding rows
