"""The Python checks of gpu_check.sh, one per subcommand; exit 0 = PASS, 77 = SKIP, else FAIL.

    python benchmarks/gpu_check.py env | reference | syncs | profile OUT_DIR | generate HF_DIR
    python benchmarks/gpu_check.py bench-summary JSON

Each runs on the GPU where there is one and on the CPU otherwise (gpu_check.sh --cpu checks the
script itself on a machine without a GPU). Lines starting with "NOTE:" go to the summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

SKIP = 77
ROOT = Path(__file__).resolve().parent.parent


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def env() -> int:
    import megatron.core

    from dsmoe_megatron.backends import grouped_mm_available, te_available
    from dsmoe_megatron.config import machine_fusions

    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if gpu else "none"
    print(f"NOTE: gpu {name} x{torch.cuda.device_count()}, torch {torch.__version__} "
          f"(cuda {torch.version.cuda}), megatron-core {megatron.core.__version__}, "
          f"transformer engine {te_available()}, grouped_mm {grouped_mm_available()}")
    print("fusions", machine_fusions())
    if gpu:  # TE's import asked about the devices: CUDA_DEVICE_MAX_CONNECTIONS must still hold
        print(f"NOTE: a CUDA context before the model: "
              f"{any(torch._C._cuda_hasPrimaryContext(i) for i in range(torch.cuda.device_count()))}"
              " (False: runtime.initialize's CUDA_DEVICE_MAX_CONNECTIONS=1 takes effect)")
    return 0


def _block(dtype, **fields):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from dsmoe_megatron.config import DeepSeekMoEConfig, deepseek_defaults
    from dsmoe_megatron.moe import DeepSeekMoE

    fields = {**deepseek_defaults(), **dict(
        num_layers=1, num_attention_heads=4, moe_expert_backend="grouped_mm",
        params_dtype=dtype, bf16=dtype == torch.bfloat16, moe_aux_loss_coeff=0.0,
        gradient_accumulation_fusion=False), **fields}  # no Megatron DDP here for main_grad
    torch.manual_seed(0)
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return DeepSeekMoE(DeepSeekMoEConfig(**fields), sub).to(device()).train()


def reference() -> int:
    """grouped_mm in fp32 and bf16 against the tests' per-token reference (fp32)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from common import grads_of, reference_block  # not from a test module: no pytest needed

    from dsmoe_megatron.backends import grouped_mm_runs

    shape = dict(hidden_size=64, num_moe_experts=8, moe_router_topk=3, moe_ffn_hidden_size=32,
                 moe_num_shared_experts=1)
    ref = _block(torch.float32, **shape, moe_expert_backend="sequential")  # its weights only
    with torch.no_grad():  # bf16-representable weights and input: the same routing in both
        for p in ref.parameters():
            p.copy_(p.bfloat16())
    x = torch.randn(16, 3, 64, device=device()).bfloat16().float()
    upstream = torch.randn_like(x)
    x_ref = x.clone().requires_grad_()
    out_ref = reference_block(ref, x_ref)
    (out_ref * upstream).sum().backward()
    expected = {"out": out_ref.detach(), **grads_of(ref, x_ref)}
    failed, ran = [], []
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
        if not grouped_mm_runs(dtype):  # torch 2.8: bf16 on sm90 only
            print(f"NOTE: {dtype}: torch {torch.__version__} has no grouped_mm for it here")
            continue
        ran.append(str(dtype))
        try:
            block = _block(dtype, **shape)
            block.load_state_dict(ref.state_dict())
            xb = x.to(dtype).clone().requires_grad_()
            out, _ = block(xb)
            (out * upstream.to(dtype)).sum().backward()
            got = {"out": out.detach(), **grads_of(block, xb)}
        except Exception as error:  # report and go on with the other dtype
            print(f"NOTE: {dtype}: {type(error).__name__}: {error}")
            failed.append(f"{dtype} raised")
            continue
        for name, want in expected.items():
            err = ((got[name].float() - want).norm() / want.norm()).item()
            print(f"{str(dtype):15} {name:40} relative error {err:.2e} (<= {tol:g}) "
                  f"{'ok' if err <= tol else 'TOO LARGE'}")
            if err > tol:
                failed.append(f"{dtype} {name} {err:.1e}")
    if failed:
        print("NOTE: differs from the per-token reference: " + ", ".join(failed))
        return 1
    if not ran:
        return SKIP
    print(f"NOTE: grouped_mm {' and '.join(ran)} match the per-token reference on "
          f"{device().type}")
    return 0


def syncs() -> int:
    """No host sync in forward + backward of the 16B-shape block at EP=1 on grouped_mm."""
    from dsmoe_megatron.profiling import HostSyncCounter

    gpu = torch.cuda.is_available()
    shape = dict(hidden_size=2048, num_moe_experts=64, moe_router_topk=6, moe_ffn_hidden_size=1408,
                 moe_num_shared_experts=2) if gpu else dict(
        hidden_size=64, num_moe_experts=16, moe_router_topk=6, moe_ffn_hidden_size=32,
        moe_num_shared_experts=2)
    block = _block(torch.bfloat16, moe_aux_loss_coeff=0.001, **shape)
    x = torch.randn(4096 if gpu else 64, 1, shape["hidden_size"], device=device(),
                    dtype=torch.bfloat16, requires_grad=True)
    block(x)[0].float().sum().backward()  # warm-up: compilation, allocator
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # raises at the first synchronising call
    try:
        with HostSyncCounter() as counter:
            out, _ = block(x)
            out.float().sum().backward()
    finally:
        if gpu:
            torch.cuda.set_sync_debug_mode(0)
    if counter.count:
        print(f"NOTE: {counter.count} host syncs: {counter.events}")
        return 1
    print(f"NOTE: no host sync in forward + backward (grouped_mm, EP=1, {device().type})")
    return 0


def _category(op: str) -> str:
    from dsmoe_megatron.profiling import GEMMS, ROW_MOVES

    name = op.removeprefix("aten::")
    if name in GEMMS or name in ("matmul", "linear"):
        return "gemm"
    if name in ROW_MOVES or name in ("argsort", "embedding_bag", "index_add"):
        return "row moves"
    fused = any(word in op.lower() for word in ("swiglu", "compiled"))  # Megatron's fused SwiGLU
    if fused or name in ("silu", "silu_backward", "mul", "mul_", "sigmoid"):
        return "activation"
    return "other"


def profile(out_dir: str) -> int:
    """Where the block's forward + backward time goes: device time per ATen op (self), summed
    into GEMMs, row moves, activation and the rest, beside the dense-equivalent MLP's."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_block import SHAPES_CPU, SHAPES_GPU, dense_equivalent

    gpu = torch.cuda.is_available()
    hidden, shared, routed, width, topk = SHAPES_GPU["16B"] if gpu else SHAPES_CPU["small-fine"]
    tokens, dtype = (16384, torch.bfloat16) if gpu else (1024, torch.float32)
    block = _block(dtype, hidden_size=hidden, num_moe_experts=routed, moe_router_topk=topk,
                   moe_ffn_hidden_size=width, moe_num_shared_experts=shared,
                   moe_aux_loss_coeff=0.001)
    dense, _ = dense_equivalent(hidden, (shared + topk) * width, dtype, device())
    x = torch.randn(tokens, 1, hidden, device=device(), dtype=dtype)
    grad = torch.randn_like(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    steps, report = 3, {}
    for label, step in (("block", lambda: block(x)[0].backward(grad)),
                        ("dense-equivalent", lambda: dense(x).backward(grad))):
        for _ in range(2):
            step()
        if gpu:
            torch.cuda.synchronize()
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if gpu:
                torch.cuda.synchronize()
        ops = {}
        for event in prof.key_averages():
            # On a GPU each kernel's time is its launching op's self device time, so host-side
            # events alone count every kernel once (compiled regions included).
            host = event.device_type == torch.autograd.DeviceType.CPU
            ms = (event.self_device_time_total if gpu else event.self_cpu_time_total) / 1e3
            if ms > 0 and host and (gpu or event.key.startswith("aten::")):
                ops[event.key] = ops.get(event.key, 0.0) + ms / steps
        by_category = {}
        for op, ms in ops.items():
            by_category[_category(op)] = by_category.get(_category(op), 0.0) + ms
        report[label] = dict(total_ms=sum(ops.values()), by_category=by_category,
                             top_ops=dict(sorted(ops.items(), key=lambda kv: -kv[1])[:15]))
        print(f"== {label}\n" + prof.key_averages().table(
            sort_by="self_device_time_total" if gpu else "self_cpu_time_total", row_limit=25))
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_category.items(),
                                                            key=lambda kv: -kv[1]))
        print(f"NOTE: {label} {'device' if gpu else 'cpu'} ms per step "
              f"{report[label]['total_ms']:.2f}: {parts}")
    meta = dict(device=torch.cuda.get_device_name() if gpu else "cpu", dtype=str(dtype),
                tokens=tokens, shape=[hidden, shared, routed, width, topk], torch=torch.__version__)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "profile.json").write_text(json.dumps(dict(meta=meta, **report), indent=1))
    return 0


def generate(hf_dir: str) -> int:
    """Load the to-hf export with transformers and generate greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=dtype)
    model.to(device()).eval()
    inputs = tokenizer("The quick brown fox", return_tensors="pt").to(device())
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or 0)
    new = out.shape[1] - inputs["input_ids"].shape[1]
    if not torch.isfinite(logits).all() or new < 1:
        print(f"NOTE: finite logits {bool(torch.isfinite(logits).all())}, {new} new tokens")
        return 1
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    print(f"NOTE: transformers {__import__('transformers').__version__} generated {new} tokens "
          f"on {device().type}: {text!r}")
    return 0


def bench_summary(results: str) -> int:
    """One NOTE per (shape, tokens, routing): each implementation's time over dense-equivalent."""
    rows = json.loads(Path(results).read_text())["rows"]
    groups = {}
    for row in rows:
        groups.setdefault((row["shape"], row["tokens"], row["routing"]), []).append(row)
    for (shape, tokens, routing), same in groups.items():
        dense = next(r["ms"] for r in same if r["impl"] == "dense-equivalent")
        ratios = ", ".join(f"{r['impl']} {r['ms'] / dense:.2f}x" for r in same
                           if r["impl"] != "dense-equivalent")
        print(f"NOTE: {shape} {tokens} tokens {routing}: dense {dense:.1f} ms; {ratios}")
    return 0


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "generate":
        return generate(*args)
    if command == "bench-summary":
        return bench_summary(*args)
    from dsmoe_megatron import runtime

    runtime.initialize()
    try:
        checks = dict(env=env, reference=reference, syncs=syncs, profile=profile)
        return checks[command](*args)
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
