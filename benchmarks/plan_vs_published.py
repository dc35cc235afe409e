"""dsmoe-plan's step-time estimate next to published MoE training throughput (information only).

For each published measurement the model and layout are written as a run config and estimated
on the same number of H100s; the table gives the published tokens/s/GPU (and model TFLOP/s/GPU
where that is what was published) beside the estimate. The planner's rates are not fitted to
these numbers, and it models dsmoe_megatron's own MoE path (no communication overlap, unfused
permute), not the optimised Megatron-core path the measurements used.

    python benchmarks/plan_vs_published.py      # writes benchmarks/results/plan_vs_published.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from dsmoe_megatron.plan import make_plan
from dsmoe_megatron.yaml_config import run_config_from_dict

RESULTS = Path(__file__).resolve().parent / "results"

# Megatron-Bridge performance summary archive (docs/performance-summary-archive.md in
# github.com/NVIDIA-NeMo/Megatron-Bridge), DGX-H100 rows; force-balanced routing, dropless.
BRIDGE = "Megatron-Bridge performance summary, DGX-H100"
# Megatron-LM, megatron/core/transformer/moe/README.md (core_r0.12.0 - core_r0.14.0): "With
# MCore v0.9, we've achieved remarkable performance of 468 TFLOPS for Mixtral 8X7B bf16
# training", and its "Reference Best Parallel Mapping" table (MCore v0.8, 8xH100 80GB HBM3,
# NVLink 4, InfiniBand 8x400 Gbit/s).
MCORE_README = "Megatron-core MoE README (core_r0.12-0.14)"

QWEN3_30B = dict(num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                 kv_channels=128, qk_layernorm=True, ffn_hidden_size=6144, num_moe_experts=128,
                 moe_router_topk=8, moe_ffn_hidden_size=768, moe_router_pre_softmax=False,
                 moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.001)
QWEN3_235B = dict(QWEN3_30B, num_layers=94, hidden_size=4096, num_attention_heads=64,
                  ffn_hidden_size=12288, moe_ffn_hidden_size=1536)
MIXTRAL_8X7B = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                    ffn_hidden_size=14336, num_moe_experts=8, moe_router_topk=2,
                    moe_ffn_hidden_size=14336, moe_router_pre_softmax=False,
                    moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01)


@dataclass
class Published:
    name: str
    source: str
    model: dict
    vocab_size: int
    gpus: int
    layout: dict
    seq_length: int
    global_batch: int
    micro_batch: int
    tokens_per_gpu: float | None = None
    tflops_per_gpu: float | None = None
    note: str = ""

    def run_config(self):
        lay = self.layout
        parallel = dict(tensor_model_parallel_size=lay["tp"], pipeline_model_parallel_size=lay["pp"],
                        virtual_pipeline_model_parallel_size=lay.get("vp"),
                        expert_model_parallel_size=lay["ep"], expert_tensor_parallel_size=1,
                        sequence_parallel=lay["tp"] > 1, bf16=True, fp8=lay.get("fp8"))
        if lay.get("split"):
            parallel.update(account_for_embedding_in_pipeline_split=True,
                            account_for_loss_in_pipeline_split=True)
        doc = {"language_model": dict(self.model), "model_parallel": parallel,
               "deepseekmoe": {"moe_num_shared_experts": 0, "moe_first_k_dense": 0},
               "seq_length": self.seq_length, "vocab_size": self.vocab_size,
               "micro_batch_size": self.micro_batch, "global_batch_size": self.global_batch}
        return run_config_from_dict(doc, instantiate_checks=False, origin=self.name)


CASES = [
    Published("Mixtral 8x7B, BF16", MCORE_README, MIXTRAL_8X7B, 32000, 64,
              dict(tp=1, pp=4, vp=8, ep=8), 4096, 256, 1, tflops_per_gpu=468,
              note="468 TFLOPS is quoted for MCore v0.9 without its layout; the layout is the "
                   "README's v0.8 reference mapping for Mixtral 8x7B (an assumption)"),
    Published("Qwen3-30B-A3B, FP8 (25.11)", BRIDGE + " (25.11 container)", QWEN3_30B, 151936,
              16, dict(tp=1, pp=2, vp=24, ep=8, fp8="hybrid"), 4096, 512, 2,
              tokens_per_gpu=5275, tflops_per_gpu=121),
    Published("Qwen3-30B-A3B, FP8 (26.02)", BRIDGE + " (26.02 container)", QWEN3_30B, 151936,
              16, dict(tp=1, pp=1, ep=16, fp8="hybrid"), 4096, 1024, 1,
              tokens_per_gpu=8960, tflops_per_gpu=206),
    Published("Qwen3-235B-A22B, FP8 (25.11)", BRIDGE + " (25.11 container)", QWEN3_235B, 151936,
              256, dict(tp=2, pp=8, vp=4, ep=32, fp8="hybrid", split=True), 4096, 2048, 1,
              tokens_per_gpu=1575, tflops_per_gpu=233,
              note="94 layers over 8 x 4 chunks: our estimate counts the embedding and the loss "
                   "as a layer each (96 / 32); the published run's exact split is not stated"),
]


def estimate(case: Published) -> dict:
    plan = make_plan(case.run_config(), case.gpus, gpu="H100-80GB")
    t = plan["step_time"]
    published_tokens = case.tokens_per_gpu
    if published_tokens is None:  # only TFLOP/s published: tokens/s with our FLOPs per token
        published_tokens = case.tflops_per_gpu * 1e12 / plan["flops_per_token"]
    return {
        "name": case.name, "source": case.source, "gpus": case.gpus, "layout": case.layout,
        "global_batch": case.global_batch, "micro_batch": case.micro_batch,
        "published_tokens_per_gpu": case.tokens_per_gpu,
        "published_tflops_per_gpu": case.tflops_per_gpu,
        "published_tokens_per_gpu_used": published_tokens,
        "estimated_tokens_per_gpu": t["tokens_per_second_per_gpu"],
        "estimated_tflops_per_gpu": t["model_tflops_per_gpu"],
        "estimated_mfu": t["mfu"],
        "estimated_step_time": t["step_time"],
        "estimate_over_published": t["tokens_per_second_per_gpu"] / published_tokens,
        "estimated_peak_gb": plan["memory"]["max_bytes_per_gpu"] / 1e9,
        "fits_80gb": plan["fit"]["fits"],
        "breakdown": t["breakdown"],
        "note": case.note,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "# dsmoe-plan estimates vs published MoE training throughput (H100)",
        "",
        f"`python benchmarks/plan_vs_published.py`, {date.today().isoformat()}. Information, "
        "not a fit: the planner's rates are its defaults. It models dsmoe_megatron's MoE path "
        "(all-to-all and TP collectives not overlapped, unfused permute / unpermute), while "
        "the published runs use Megatron-core's optimised MoE path (fused permutation, "
        "communication overlap, force-balanced routing).",
        "",
        "| run | GPUs | layout | published tokens/s/GPU | published TFLOP/s/GPU | "
        "estimated tokens/s/GPU | estimated / published | estimated MFU | est. peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lay = r["layout"]
        layout = (f"TP{lay['tp']} PP{lay['pp']}" + (f" VP{lay['vp']}" if lay.get("vp") else "")
                  + f" EP{lay['ep']}, GBS {r['global_batch']}, MBS {r['micro_batch']}")
        published = (f"{r['published_tokens_per_gpu']:,}" if r["published_tokens_per_gpu"]
                     else f"({r['published_tokens_per_gpu_used']:,.0f} from TFLOP/s)")
        lines.append(
            f"| {r['name']} | {r['gpus']} | {layout} | {published} | "
            f"{r['published_tflops_per_gpu']} | {r['estimated_tokens_per_gpu']:,.0f} | "
            f"{r['estimate_over_published']:.2f} | {r['estimated_mfu']:.1%} | "
            f"{r['estimated_peak_gb']:.0f}{'' if r['fits_80gb'] else ' (does not fit)'} |")
    lines += ["", "Sources:"]
    for source in dict.fromkeys(r["source"] for r in rows):
        lines.append(f"- {source}")
    notes = [f"- {r['name']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", "Estimated step-time breakdown (s):", ""]
    keys = [k for k in rows[0]["breakdown"] if any(r["breakdown"][k] for r in rows)]
    lines.append("| run | " + " | ".join(keys) + " |")
    lines.append("| --- |" + " --- |" * len(keys))
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['breakdown'][k]:.3f}" for k in keys)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    rows = [estimate(case) for case in CASES]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan_vs_published.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = markdown(rows)
    (RESULTS / "plan_vs_published.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
