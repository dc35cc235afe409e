"""Forward+backward time of the DeepSeekMoE block against its peers, in one run.

    python benchmarks/bench_block.py              # CPU: small shapes; GPU: the 16B and 145B layers

Compared, on the same tokens and routing:
  dsmoe[<backend>]   our block, for each expert backend available here
  dense-equivalent   one SwiGLU MLP of width (shared + top-k) x expert width: the same math FLOPs,
                     the ideal the MoE block approaches (ratio 1.0)
  naive-loop         a per-expert Python loop over token masks, as in the released HF modeling code
  megatron-moe[..]   Megatron-core's own MoELayer: TEGroupedMLP with Transformer Engine,
                     its local SequentialMLP without
TFLOP/s counts only the FLOPs the math needs: 3 x (forward) for forward+backward.
Results go to benchmarks/results/<device>_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES_GPU = {
    # hidden, shared, routed, width, top-k (DeepSeekMoE 16B and 145B layers)
    "16B": (2048, 2, 64, 1408, 6),
    "145B": (4096, 4, 128, 1408, 12),
}
SHAPES_CPU = {"small": (256, 1, 16, 128, 3), "small-fine": (256, 2, 32, 64, 6)}


def math_flops(tokens, hidden, shared, width, topk, routed):
    per_token = 2 * 3 * hidden * width * (shared + topk) + 2 * hidden * routed
    return 3 * per_token * tokens  # forward + backward (2x forward)


def timed(fn, device, repeats):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_block(hidden, shared, routed, width, topk, backend, dtype, device):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from dsmoe_megatron.config import DeepSeekMoEConfig, deepseek_defaults
    from dsmoe_megatron.moe import DeepSeekMoE

    config = DeepSeekMoEConfig(**{
        **deepseek_defaults(), **dict(
            num_layers=1, hidden_size=hidden, num_attention_heads=8, num_moe_experts=routed,
            moe_router_topk=topk, moe_ffn_hidden_size=width, moe_num_shared_experts=shared,
            moe_aux_loss_coeff=0.001, moe_expert_backend=backend, params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            gradient_accumulation_fusion=False)})  # no Megatron DDP here for main_grad
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return DeepSeekMoE(config, sub).to(device)


def copy_weights(source, block):
    """``block`` <- ``source``'s weights (``source`` on a torch backend). Transformer Engine's
    GroupedLinear keeps one weight per expert (``weight0``...) and its FP8 state where the torch
    backends' state dict has one [E, ...] tensor per projection: its experts are copied one by
    one."""
    if isinstance(block.experts.gate_up_proj, torch.nn.Parameter):
        block.load_state_dict(source.state_dict())
        return
    rest = {k: v for k, v in source.state_dict().items() if not k.startswith("experts.")}
    missing, unexpected = block.load_state_dict(rest, strict=False)
    if unexpected or any(not k.startswith("experts.") for k in missing):
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            layer = getattr(block.experts, name)
            for i, weight in enumerate(getattr(source.experts, name)):
                getattr(layer, f"weight{i}").copy_(weight)


def skew_router(block, hot_fraction=0.125, strength=4.0):
    """Make a few experts win most tokens: their router rows share a common direction."""
    with torch.no_grad():
        weight = block.router.weight
        hot = max(1, int(weight.shape[0] * hot_fraction))
        direction = torch.randn(weight.shape[1], device=weight.device, dtype=weight.dtype)
        weight[:hot] += strength * direction / direction.norm() * weight.norm(dim=1, keepdim=True)[:hot]
    return direction


def naive_loop(block, x):
    """Per-expert masks over the tokens, like the released modeling code's training path."""
    experts = block.experts
    tokens = x.reshape(-1, x.shape[-1])
    routing = block.router(x)
    out = torch.zeros_like(tokens)
    for e in range(experts.num_experts):
        hit = routing.expert_idx == e
        rows = hit.any(-1).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        h = tokens[rows]
        gate_proj, up_proj = experts.gate_up_proj[e].chunk(2, dim=0)
        y = F.linear(F.silu(F.linear(h, gate_proj)) * F.linear(h, up_proj), experts.down_proj[e])
        gate = (routing.gates * hit)[rows].sum(-1, keepdim=True).to(y.dtype)
        out.index_add_(0, rows, y * gate)
    shared, _ = block.shared_experts(x)
    return out.view_as(x) + shared


def dense_equivalent(hidden, width, dtype, device):
    fc1 = torch.nn.Linear(hidden, 2 * width, bias=False, dtype=dtype, device=device)
    fc2 = torch.nn.Linear(width, hidden, bias=False, dtype=dtype, device=device)

    def forward(x):
        gate, up = fc1(x).chunk(2, dim=-1)
        return fc2(F.silu(gate) * up)

    return forward, [fc1.weight, fc2.weight]


def megatron_moe(hidden, shared, routed, width, topk, dtype, device):
    """Megatron-core's MoELayer (alltoall dispatcher): TEGroupedMLP where Transformer Engine
    imports, its local SequentialMLP elsewhere. Returns (label, layer)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from dsmoe_megatron.backends import te_available

    te = te_available()
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=8, num_moe_experts=routed,
        moe_router_topk=topk, moe_ffn_hidden_size=width, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, moe_grouped_gemm=te,
        moe_shared_expert_intermediate_size=shared * width, moe_router_pre_softmax=True,
        moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.001, moe_router_dtype="fp32",
        bias_activation_fusion=te, params_dtype=dtype, bf16=dtype == torch.bfloat16,
    )
    builder = get_moe_module_spec(use_te=te, num_experts=routed, moe_grouped_gemm=te)
    layer = builder(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                    is_mtp_layer=False)
    return f"megatron-moe[{'TEGroupedMLP' if te else 'SequentialMLP'}]", layer.to(device)


def bench_shape(name, shape, tokens, routing, dtype, device, repeats):
    from dsmoe_megatron.backends import grouped_mm_available, te_available

    hidden, shared, routed, width, topk = shape
    torch.manual_seed(0)
    x = torch.randn(tokens, 1, hidden, dtype=dtype, device=device)
    grad = torch.randn_like(x)
    rows = []
    flops = math_flops(tokens, hidden, shared, width, topk, routed)

    def record(label, fn):
        seconds = timed(fn, device, repeats)
        rows.append(dict(shape=name, tokens=tokens, routing=routing, impl=label,
                         ms=seconds * 1e3, tokens_per_s=tokens / seconds,
                         tflops=flops / seconds / 1e12))

    backends = ["sequential"] + (["grouped_mm"] if grouped_mm_available() else [])
    backends += ["te"] if te_available() else []
    reference_block = None
    for backend in backends:
        block = make_block(hidden, shared, routed, width, topk, backend, dtype, device)
        if reference_block is None:
            reference_block = block
            hot_direction = skew_router(block) if routing == "skewed" else None
        else:
            copy_weights(reference_block, block)
        inputs = x + hot_direction if hot_direction is not None else x

        def step(block=block, inputs=inputs):
            out, _ = block(inputs)
            out.backward(grad)

        record(f"dsmoe[{backend}]", step)
    inputs = x + hot_direction if hot_direction is not None else x

    def naive_step():
        naive_loop(reference_block, inputs).backward(grad)

    record("naive-loop", naive_step)
    dense, _ = dense_equivalent(hidden, (shared + topk) * width, dtype, device)
    record("dense-equivalent", lambda: dense(inputs).backward(grad))
    label, mcore = megatron_moe(hidden, shared, routed, width, topk, dtype, device)

    def mcore_step():
        out, _ = mcore(inputs.detach().requires_grad_())
        out.backward(grad)

    record(label, mcore_step)
    return rows


def table(rows):
    lines = ["| shape | tokens | routing | impl | ms | tokens/s | TFLOP/s | x dense | x naive |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        same = [r for r in rows if (r["shape"], r["tokens"], r["routing"]) ==
                (row["shape"], row["tokens"], row["routing"])]
        dense = next(r["ms"] for r in same if r["impl"] == "dense-equivalent")
        naive = next(r["ms"] for r in same if r["impl"] == "naive-loop")
        lines.append(
            f"| {row['shape']} | {row['tokens']} | {row['routing']} | {row['impl']} | "
            f"{row['ms']:.2f} | {row['tokens_per_s']:.0f} | {row['tflops']:.3f} | "
            f"{row['ms'] / dense:.2f} | {row['ms'] / naive:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    from dsmoe_megatron import runtime

    parser = argparse.ArgumentParser(description="DeepSeekMoE block benchmark")
    parser.add_argument("--tokens", type=int, nargs="*", default=None)
    parser.add_argument("--shapes", nargs="*", default=None,
                        help=f"GPU: {list(SHAPES_GPU)}, CPU: {list(SHAPES_CPU)}")
    parser.add_argument("--routing", nargs="*", default=["balanced", "skewed"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    rt = runtime.initialize()
    gpu = rt.device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = SHAPES_GPU if gpu else SHAPES_CPU
    shapes = {k: v for k, v in shapes.items() if args.shapes is None or k in args.shapes}
    token_counts = args.tokens or ([4096, 16384, 32768] if gpu else [1024, 4096])
    repeats = args.repeats or (10 if gpu else 3)
    rows = []
    for name, shape in shapes.items():
        for tokens in token_counts:
            for routing in args.routing:
                rows.extend(bench_shape(name, shape, tokens, routing, dtype, rt.device, repeats))
                print(f"done: {name} {tokens} tokens {routing}", flush=True)
    device_name = torch.cuda.get_device_name() if gpu else platform.processor() or "cpu"
    import megatron.core

    meta = dict(device=device_name, dtype=str(dtype), torch=torch.__version__,
                megatron_core=megatron.core.__version__, date=datetime.date.today().isoformat(),
                threads=torch.get_num_threads())
    text = table(rows)
    print(json.dumps(meta))
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{'gpu' if gpu else 'cpu'}_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / f"{stem}.md").write_text(f"{json.dumps(meta)}\n\n{text}\n")
    runtime.shutdown()


if __name__ == "__main__":
    main()
