"""Activation memory, ATen ops and host syncs of one DeepSeekMoE block, measured on CPU.

    python benchmarks/bench_memory.py                       # 16B layer shape + a small one, EP 1 and 2
    python benchmarks/bench_memory.py --shapes small --ep 1 --baseline benchmarks/results/old.json

Saved bytes/token: bytes autograd keeps for backward after one forward (saved_tensors_hooks,
each storage once, the block's input and parameters excluded), bf16, divided by the rank's
tokens. Compared with a dense SwiGLU MLP of the same activated width ((shared + top-k) x expert
width, gate/up fused, eager SwiGLU as in Megatron's MLP without fusions), the same with a fused
SwiGLU (keeps only fc1's output), and Megatron-core's MoELayer where it runs here.
CPUs have no fast bf16 GEMM, so bf16 matrix products are computed in fp32 and rounded to bf16:
autograd sees the same bf16 tensors, so the bytes are those of a bf16 run.

Ops and host syncs per MoE layer (forward, backward) are counted on the small shape in bf16:
top-level ATen ops (torch.profiler), dispatched non-view ATen ops (about one launch each) and
host syncs (profiling.HostSyncCounter). Results go to results/memory_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# hidden, shared, routed, width, top-k. "small" keeps the 16B layer's H/W ratio (2048 / 1408).
SHAPES = {"16B": (2048, 2, 64, 1408, 6), "small": (256, 2, 64, 176, 6)}
# Block variants: extra config fields (selective recompute uses Megatron's recompute_modules).
VARIANTS = {
    "block": {},
    "recompute moe_act": dict(recompute_granularity="selective", recompute_modules=["moe_act"]),
    "recompute moe_act+shared_experts": dict(recompute_granularity="selective",
                                             recompute_modules=["moe_act", "shared_experts"]),
    "recompute moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}
GEMMS = {"mm", "addmm", "bmm", "_grouped_mm"}


class Fp32Gemms(TorchDispatchMode):
    """bf16 GEMMs computed in fp32 and rounded to bf16 (CPUs have no fast bf16 kernels)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in GEMMS and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
            return func(*up, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def make_block(shape, ep: int, **overrides):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from dsmoe_megatron.config import DeepSeekMoEConfig, deepseek_defaults
    from dsmoe_megatron.moe import DeepSeekMoE

    hidden, shared, routed, width, topk = shape
    config = DeepSeekMoEConfig(
        **{**deepseek_defaults(), **dict(
            num_layers=1, hidden_size=hidden, num_attention_heads=8, num_moe_experts=routed,
            moe_router_topk=topk, moe_ffn_hidden_size=width, moe_num_shared_experts=shared,
            moe_aux_loss_coeff=0.001, moe_expert_backend="grouped_mm",
            expert_model_parallel_size=ep, params_dtype=torch.bfloat16, bf16=True,
            pipeline_dtype=torch.bfloat16), **overrides})
    torch.manual_seed(0)
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    block = DeepSeekMoE(config, sub)
    block.set_layer_number(1)
    return block.train()


def dense_equivalent(shape, fused_swiglu: bool):
    hidden, shared, _, width, topk = shape
    active = (shared + topk) * width
    fc1 = torch.nn.Linear(hidden, 2 * active, bias=False, dtype=torch.bfloat16)
    fc2 = torch.nn.Linear(active, hidden, bias=False, dtype=torch.bfloat16)

    def forward(x):
        h = fc1(x)
        if fused_swiglu:
            from megatron.core.fusions.fused_bias_swiglu import SwiGLUFunction

            # Megatron's fused SwiGLU saves only its input (jit off: eager math, same bytes).
            act = SwiGLUFunction.apply(h.view(-1, h.shape[-1]), False, False).view(
                *h.shape[:-1], -1)
        else:
            gate, up = h.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return fc2(act)

    return forward, [fc1.weight, fc2.weight]


def megatron_moe_layer(shape):
    """Megatron-core's MoELayer (local SequentialMLP, alltoall dispatcher), or None if it fails."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    hidden, shared, routed, width, topk = shape
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=8, num_moe_experts=routed,
        moe_router_topk=topk, moe_ffn_hidden_size=width, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, moe_shared_expert_intermediate_size=(
            shared * width), moe_router_pre_softmax=True, moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.001, params_dtype=torch.bfloat16, bf16=True,
        bias_activation_fusion=False, moe_router_dtype="fp32",
    )
    builder = get_moe_module_spec(use_te=False, num_experts=routed, moe_grouped_gemm=False)
    layer = builder(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                    is_mtp_layer=False)
    return layer.train()


def per_token_bytes(forward, x, params):
    from dsmoe_megatron.profiling import saved_bytes

    with Fp32Gemms():
        _, saved = saved_bytes(lambda: forward(x), exclude=[x, *params])
    tokens = x.shape[0] * x.shape[1]
    return dict(bytes_per_token=saved.total / tokens,
                by_node={k: v / tokens for k, v in sorted(saved.by_node.items(),
                                                          key=lambda kv: -kv[1])})


def block_forward(block):
    return lambda x: block(x)[0]


def measure_memory(shape, tokens: int, ep: int) -> dict:
    torch.manual_seed(1)
    x = torch.randn(tokens, 1, shape[0], dtype=torch.bfloat16, requires_grad=True)
    rows = {}
    for name, overrides in VARIANTS.items():
        try:
            block = make_block(shape, ep, **overrides)
        except Exception as err:  # noqa: BLE001 - a variant this code does not support
            rows[name] = dict(error=f"{type(err).__name__}: {str(err)[:160]}")
            continue
        rows[name] = per_token_bytes(block_forward(block), x, list(block.parameters()))
        del block
    if ep == 1:
        for name, fused in (("dense-equivalent", False), ("dense-equivalent fused SwiGLU", True)):
            forward, params = dense_equivalent(shape, fused)
            rows[name] = per_token_bytes(forward, x, params)
        try:
            layer = megatron_moe_layer(shape)
            rows["megatron MoELayer (SequentialMLP)"] = per_token_bytes(
                block_forward(layer), x, list(layer.parameters()))
        except Exception as err:  # noqa: BLE001
            rows["megatron MoELayer (SequentialMLP)"] = dict(
                error=f"{type(err).__name__}: {str(err)[:160]}")
    return rows


def measure_ops(shape, tokens: int, ep: int) -> dict:
    """ATen ops and host syncs of one block, forward and backward, bf16."""
    from dsmoe_megatron.profiling import HostSyncCounter, count_aten_ops

    torch.manual_seed(1)
    x = torch.randn(tokens, 1, shape[0], dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    block = make_block(shape, ep)
    fwd = block_forward(block)
    forward_ops = count_aten_ops(lambda: fwd(x))
    # Backward needs a fresh graph per run (count_aten_ops runs its callable twice).
    graphs = [fwd(x), fwd(x)]
    backward_ops = count_aten_ops(lambda: graphs.pop().backward(grad))
    with HostSyncCounter() as fwd_syncs:
        out = fwd(x)
    with HostSyncCounter() as bwd_syncs:
        out.backward(grad)
    result = dict(forward_ops=forward_ops.top_level, forward_dispatched=forward_ops.dispatched,
                  backward_ops=backward_ops.top_level,
                  backward_dispatched=backward_ops.dispatched,
                  forward_syncs=fwd_syncs.events, backward_syncs=bwd_syncs.events)
    if ep == 1:
        dense, _ = dense_equivalent(shape, False)
        d_fwd = count_aten_ops(lambda: dense(x))
        graphs = [dense(x), dense(x)]
        d_bwd = count_aten_ops(lambda: graphs.pop().backward(grad))
        result["dense"] = dict(forward_ops=d_fwd.top_level, forward_dispatched=d_fwd.dispatched,
                               backward_ops=d_bwd.top_level,
                               backward_dispatched=d_bwd.dispatched)
    return result


def measure_traffic(shape, tokens: int, ep: int) -> dict:
    """Bytes moved per token outside the GEMMs (profiling.bytes_moved), forward and backward,
    bf16: the block, and at EP=1 the dense-equivalent (eager SwiGLU, like the block's on CPU)."""
    from dsmoe_megatron.profiling import bytes_moved

    torch.manual_seed(1)
    x = torch.randn(tokens, 1, shape[0], dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def per_token(forward):
        outputs = []
        with Fp32Gemms():
            fwd = bytes_moved(lambda: outputs.append(forward(x)))
            bwd = bytes_moved(lambda: outputs.pop().backward(grad))
        n = x.shape[0] * x.shape[1]
        return dict(forward=fwd.other / n, backward=bwd.other / n,
                    row_moves=(fwd.row_moves + bwd.row_moves) / n, gemm=(fwd.gemm + bwd.gemm) / n,
                    by_op={k: v / n for k, v in sorted(
                        {**collections.Counter(fwd.by_op) + collections.Counter(bwd.by_op)}.items(),
                        key=lambda kv: -kv[1])})

    rows = {"block": per_token(block_forward(make_block(shape, ep)))}
    if ep == 1:
        forward, _ = dense_equivalent(shape, fused_swiglu=False)
        rows["dense-equivalent"] = per_token(forward)
    return rows


def run_rank(shapes, tokens, op_tokens, ep):
    results = {}
    for name in shapes:
        results[name] = dict(memory=measure_memory(SHAPES[name], tokens, ep),
                             traffic=measure_traffic(SHAPES[name], tokens, ep))
        print(f"[rank {torch.distributed.get_rank()}] memory {name} ep{ep} done", flush=True)
    results["ops"] = measure_ops(SHAPES["small"], op_tokens, ep)
    return results


def _rank_main(rank, world, port, args, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from dsmoe_megatron import runtime

    runtime.initialize(runtime.ParallelLayout(expert=world))
    try:
        queue.put((rank, run_rank(*args, world)))
    finally:
        runtime.shutdown()


def run_ep(ep: int, shapes, tokens, op_tokens) -> list[dict]:
    from dsmoe_megatron import runtime

    if ep == 1:
        runtime.initialize()
        try:
            return [run_rank(shapes, tokens, op_tokens, 1)]
        finally:
            runtime.shutdown()
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = runtime.free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, ep, port, (shapes, tokens, op_tokens), queue))
             for r in range(ep)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
    return [results[r] for r in range(ep)]


def markdown(meta, results, baseline) -> str:
    lines = [json.dumps(meta), ""]
    for ep, ranks in results.items():
        for shape in ranks[0]:
            if shape == "ops":
                continue
            rows = ranks[0][shape]["memory"]
            dense = rows.get("dense-equivalent", {}).get("bytes_per_token") or (
                results["1"][0][shape]["memory"]["dense-equivalent"]["bytes_per_token"])
            lines += [f"### {shape}, EP={ep}, {meta['tokens']} tokens/rank, bf16", "",
                      "| impl | saved B/token (rank 0) | x dense-equivalent | before |",
                      "| --- | --- | --- | --- |"]
            for name, row in rows.items():
                if "error" in row:
                    lines.append(f"| {name} | n/a ({row['error']}) | | |")
                    continue
                before = _baseline_value(baseline, ep, shape, name)
                lines.append(f"| {name} | {row['bytes_per_token']:,.0f} | "
                             f"{row['bytes_per_token'] / dense:.2f} | {before} |")
            lines += ["", "Per autograd node, block (B/token): " + ", ".join(
                f"{k} {v:,.0f}" for k, v in list(rows["block"]["by_node"].items())[:12]), ""]
            if "traffic" in ranks[0][shape]:
                lines += _traffic_lines(results, baseline, ep, shape)
    lines += ["### Ops and host syncs per MoE layer (small shape, bf16)", "",
              "| run | fwd top-level | fwd dispatched | bwd top-level | bwd dispatched | "
              "host syncs fwd | host syncs bwd |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, source in (("now", results), ("before", (baseline or {}).get("results"))):
        for ep, ranks in (source or {}).items():
            if ep not in results:
                continue
            ops = ranks[0]["ops"]
            lines.append(_ops_row(f"{label} block EP={ep}", ops))
            if "dense" in ops:
                lines.append(_ops_row(f"{label} dense-equivalent", ops["dense"]))
    return "\n".join(lines) + "\n"


def _traffic_lines(results, baseline, ep, shape) -> list[str]:
    rows = results[ep][0][shape]["traffic"]
    dense = results["1"][0][shape]["traffic"]["dense-equivalent"] if "1" in results else None
    lines = ["Bytes moved outside the GEMMs, per token (forward + backward, bf16, rank 0; "
             "profiling.bytes_moved):", "",
             "| impl | forward | backward | total | x dense-equivalent | before | of which row "
             "moves | before | GEMM operands |", "| --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- |"]
    for name, row in rows.items():
        total = row["forward"] + row["backward"]
        ratio = f"{total / (dense['forward'] + dense['backward']):.2f}" if dense else ""
        try:
            old = baseline["results"][ep][0][shape]["traffic"][name]
            before = f"{old['forward'] + old['backward']:,.0f}"
            moves_before = f"{old['row_moves']:,.0f}"
        except (KeyError, TypeError, IndexError):
            before = moves_before = ""
        lines.append(f"| {name} | {row['forward']:,.0f} | {row['backward']:,.0f} | {total:,.0f} | "
                     f"{ratio} | {before} | {row['row_moves']:,.0f} | {moves_before} | "
                     f"{row['gemm']:,.0f} |")
    lines += ["", "By op, block (B/token): " + ", ".join(
        f"{k} {v:,.0f}" for k, v in list(rows["block"]["by_op"].items())[:14]), ""]
    return lines


def _ops_row(label, ops) -> str:
    syncs = [f"{len(ops.get(k, []))} {sorted(set(ops.get(k, [])))}" if k in ops else ""
             for k in ("forward_syncs", "backward_syncs")]
    return (f"| {label} | {ops['forward_ops']} | {ops['forward_dispatched']} | "
            f"{ops['backward_ops']} | {ops['backward_dispatched']} | {syncs[0]} | {syncs[1]} |")


def _baseline_value(baseline, ep, shape, name) -> str:
    try:
        value = baseline["results"][ep][0][shape]["memory"][name]["bytes_per_token"]
    except (KeyError, TypeError, IndexError):
        return ""
    return f"{value:,.0f}"


def load_baseline(path, shapes, eps) -> dict:
    """An earlier results json, read before the measurement (minutes) rather than after it: it
    must hold the memory rows of every shape and the ops of every EP asked for, measured at the
    same shapes."""
    fix = ("give a results json bench_memory.py wrote (e.g. "
           "benchmarks/results/memory_baseline_d20cd31.json; a relative path is from the current "
           "directory), or pass --shapes / --ep to match what it holds")
    try:
        baseline = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"--baseline {path}: cannot be read as JSON ({e}); {fix}") from None
    for ep in eps:
        for shape in shapes:
            try:
                rank0 = baseline["results"][str(ep)][0]
                rank0[shape]["memory"], rank0["ops"]
                measured = baseline["meta"]["shapes"][shape]
            except (KeyError, TypeError, IndexError):
                raise SystemExit(f"--baseline {path} holds no memory results for shape {shape} "
                                 f"at EP={ep}; {fix}") from None
            if list(measured) != list(SHAPES[shape]):
                raise SystemExit(f"--baseline {path} measured shape {shape} as {measured}, not "
                                 f"{list(SHAPES[shape])} (hidden, shared, routed, width, top-k); "
                                 f"{fix}")
    return baseline


def main(argv=None):
    parser = argparse.ArgumentParser(description="DeepSeekMoE block memory / ops / syncs")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ep", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--op-tokens", type=int, default=256)
    parser.add_argument("--baseline", help="an earlier results json: adds a 'before' column")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default=None, help="file stem (default memory_<date>)")
    args = parser.parse_args(argv)
    baseline = load_baseline(args.baseline, args.shapes, args.ep) if args.baseline else None
    results = {str(ep): run_ep(ep, args.shapes, args.tokens, args.op_tokens) for ep in args.ep}
    import megatron.core

    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                megatron_core=megatron.core.__version__, tokens=args.tokens,
                op_tokens=args.op_tokens, shapes={k: SHAPES[k] for k in args.shapes},
                shape_fields="hidden, shared, routed, width, top-k",
                commit=os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip())
    text = markdown(meta, results, baseline)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"memory_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    (out / f"{stem}.md").write_text(text)


if __name__ == "__main__":
    main()
