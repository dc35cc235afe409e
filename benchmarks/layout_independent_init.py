"""What layout-independent initial weights cost at start-up, against building the model.

    python benchmarks/layout_independent_init.py        # single process; GPU if there is one

Builds GPTModel with DeepSeekMoE layers (Megatron-core's own initialisation), then times
``redraw_initial_weights`` (each random tensor drawn whole from its own seeded generator). On one
rank every tensor is drawn once more; under TP / expert TP each rank draws the whole of its
(TP-sharded) tensors, i.e. about as much as the single rank here. Results go to
benchmarks/results/layout_independent_init.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

SHAPES = {
    # name: (layers, hidden, heads, dense ffn, routed experts, expert width, shared, top-k)
    "small": (4, 256, 4, 1024, 16, 128, 1, 3),
    "medium": (8, 1024, 8, 4096, 32, 512, 2, 6),
}


def measure(layers, hidden, heads, ffn, experts, width, shared, topk) -> dict:
    from dsmoe_megatron.config import DeepSeekMoEConfig, deepseek_defaults
    from dsmoe_megatron.initialization import record_init_methods, redraw_initial_weights
    from dsmoe_megatron.model import build_model_chunks

    config = DeepSeekMoEConfig(
        **deepseek_defaults(), num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=ffn, num_moe_experts=experts, moe_ffn_hidden_size=width,
        moe_num_shared_experts=shared, moe_router_topk=topk, moe_first_k_dense=1,
        pipeline_dtype=torch.float32)
    start = time.perf_counter()
    with record_init_methods(config) as record:
        chunks = build_model_chunks(config, 32768, 2048)
    built = time.perf_counter()
    redraw_initial_weights(chunks, record, seed=1234)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    redrawn = time.perf_counter()
    params = sum(p.numel() for c in chunks for p in c.parameters())
    return {"parameters": params, "build_s": round(built - start, 3),
            "redraw_s": round(redrawn - built, 3),
            "redraw_over_build": round((redrawn - built) / (built - start), 3)}


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    from dsmoe_megatron import runtime

    rt = runtime.initialize()
    results = {name: measure(*shape) for name, shape in SHAPES.items()}
    runtime.shutdown()
    out = {"device": torch.cuda.get_device_name() if rt.device.type == "cuda" else
           f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
           "threads)", "torch": torch.__version__, "results": results}
    path = Path(__file__).parent / "results" / "layout_independent_init.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
