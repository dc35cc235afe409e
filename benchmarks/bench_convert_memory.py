"""Peak memory (RSS) of `dsmoe-convert from-hf` and `to-hf` against model size.

    python benchmarks/bench_convert_memory.py                       # 3 sizes, this tree
    python benchmarks/bench_convert_memory.py --before main         # and an earlier revision

For each size a synthetic DeepSeekMoE model (random bf16 weights, 16 routed + 2 shared experts
per layer, first layer dense; the sizes differ by depth) is written as a Hugging Face directory.
Each conversion runs in its own process, which reports its peak RSS (VmHWM). "imports" is a
process that only imports the converter's modules. With ``--before REV``
the same conversions run with that revision's package (``git archive``) and the outputs of the
two are compared: safetensors files byte for byte, dist checkpoints item by item (the serialized
bytes of every tensor and object). Results go to benchmarks/results/convert_memory_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this tree's package, also for the helpers used here
IMPORTS = ("import dsmoe_megatron.convert, dsmoe_megatron.model, dsmoe_megatron.checkpoint, "
           "dsmoe_megatron.yaml_config, safetensors.torch, torch.distributed.checkpoint")


def synthetic_config(num_layers: int, hidden: int = 1024, vocab: int = 8192) -> dict:
    """config.json of a DeepSeekMoE model: first layer dense, then 16 routed experts (top-4) and
    2 shared experts of width hidden / 2 per layer."""
    return {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
        "moe_intermediate_size": hidden // 2, "num_hidden_layers": num_layers,
        "num_attention_heads": 8, "num_key_value_heads": 8, "n_shared_experts": 2,
        "n_routed_experts": 16, "num_experts_per_tok": 4, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "norm_topk_prob": False, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def parameter_count(config: dict) -> int:
    from dsmoe_megatron.hf.mapping import hf_dims, hf_expected_shapes

    shapes = hf_expected_shapes(hf_dims(config)).values()
    return sum(int(torch.Size(s).numel()) for s in shapes)


def write_synthetic_hf(directory: Path, config: dict, dtype: torch.dtype = torch.bfloat16,
                       shard_bytes: int = 500 * 10**6, seed: int = 0) -> None:
    """config.json + random safetensors shards + index, one shard in memory at a time."""
    from safetensors.torch import save_file

    from dsmoe_megatron.hf.mapping import hf_dims, hf_expected_shapes
    from dsmoe_megatron.hf.streaming import plan_shards

    shapes = hf_expected_shapes(hf_dims(config))
    groups = plan_shards(shapes, dtype, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            base = 1.0 if name.endswith("norm.weight") else 0.0  # RMSNorm weights near 1
            shard[name] = (base + 0.02 * torch.randn(shapes[name], generator=gen)).to(dtype)
            weight_map[name] = filename
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))


# The child reports its own peak: VmHWM belongs to the process image that exec created, whereas
# the ru_maxrss of a child starts from its parent's (fork copies it, exec keeps the maximum).
MEASURE = """
import sys
{body}
hwm = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
open(sys.argv[1], "w").write(hwm)
"""
CONVERT = "from dsmoe_megatron.convert import main\nassert main(sys.argv[2:]) == 0"


def peak_rss_mb(body: str, argv: list[str], package_root: Path) -> float:
    """Run ``body`` (with ``argv`` after a result path in sys.argv) in a fresh Python with
    ``package_root`` first on the path; its peak RSS in MB."""
    env = {**os.environ, "PYTHONPATH": str(package_root), "PYTHONWARNINGS": "ignore"}
    with tempfile.NamedTemporaryFile("r") as result:
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE.format(body=body), result.name, *argv], env=env,
            cwd=package_root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv} failed:\n{proc.stderr[-3000:]}")
        return int(result.read()) / 1024  # kB


def export_revision(rev: str, into: Path) -> Path:
    """The package as it was at ``rev`` (git archive), for the before/after comparison."""
    archive = into / "package.tar"
    subprocess.run(["git", "archive", "-o", str(archive), rev, "dsmoe_megatron"], cwd=REPO,
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def same_checkpoint(a: Path, b: Path) -> bool:
    """Same tensors, chunks and objects, each saved item byte for byte (files may differ)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta_a, meta_b = (FileSystemReader(str(d)).read_metadata() for d in (a, b))
    if meta_a.state_dict_metadata != meta_b.state_dict_metadata:
        return False
    if set(meta_a.storage_data) != set(meta_b.storage_data):
        return False

    def item(ckpt: Path, info) -> bytes:
        with open(ckpt / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    return all(item(a, info) == item(b, meta_b.storage_data[index])
               for index, info in meta_a.storage_data.items())


def same_hf_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    if names != sorted(p.name for p in b.glob("*.safetensors")):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes()
               for n in [*names, "model.safetensors.index.json"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6, 18],
                        help="model depths (2 / 6 / 18 layers: about 62M / 192M / 582M params)")
    parser.add_argument("--before", metavar="REV", help="also run this git revision's package")
    parser.add_argument("--max-shard-size", default="200MB", help="to-hf output shard size")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    packages = {"after": REPO}
    if args.before:
        packages["before"] = export_revision(args.before, Path(tempfile.mkdtemp(dir=work)))
    rows = []
    imports = {name: peak_rss_mb(IMPORTS, [], root) for name, root in packages.items()}
    for layers in args.layers:
        config = synthetic_config(layers)
        params = parameter_count(config)
        size = work / f"L{layers}"
        shutil.rmtree(size, ignore_errors=True)
        write_synthetic_hf(size / "hf", config)
        row = {"layers": layers, "parameters": params, "weights_mb": params * 2 / 1e6}
        for name, root in packages.items():
            megatron, hf = size / f"megatron_{name}", size / f"hf_{name}"
            row[f"from_hf_{name}_mb"] = peak_rss_mb(
                CONVERT, ["from-hf", "--hf", str(size / "hf"), "--out", str(megatron),
                          "--dtype", "bf16"], root)
            row[f"to_hf_{name}_mb"] = peak_rss_mb(
                CONVERT, ["to-hf", "--checkpoint", str(megatron), "--out", str(hf),
                          "--max-shard-size", args.max_shard_size], root)
        if "before" in packages:
            row["same_checkpoint"] = same_checkpoint(
                *(size / f"megatron_{n}" / "iter_0000000" for n in ("before", "after")))
            row["same_hf_files"] = same_hf_output(size / "hf_before", size / "hf_after")
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(size)
    write_results(args.out, rows, imports, args)


def write_results(out: Path, rows: list[dict], imports: dict, args) -> None:
    date = datetime.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": date, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "python": platform.python_version(), "torch": torch.__version__,
            "max_shard_size": args.max_shard_size, "before": args.before,
            "imports_mb": imports}
    (out / f"convert_memory_{date}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    names = [n for n in ("before", "after") if n in imports]
    header = ["layers", "parameters", "bf16 weights (MB)"]
    header += [f"{d} {n} (MB)" for n in names for d in ("from-hf", "to-hf")]
    if "before" in names:
        header += ["outputs identical"]
    lines = [f"# dsmoe-convert peak RSS ({date})", "",
             f"{meta['machine']}, Python {meta['python']}, torch {meta['torch']}; synthetic "
             f"bf16 DeepSeekMoE models; to-hf --max-shard-size {args.max_shard_size}; "
             + "; ".join(f"imports alone ({n}): {imports[n]:.0f} MB" for n in names)
             + (f"; before = `{args.before}`" if args.before else "") + ".", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["layers"]), f"{r['parameters'] / 1e6:.0f}M", f"{r['weights_mb']:.0f}"]
        cells += [f"{r[f'{d}_{n}_mb']:.0f}" for n in names for d in ("from_hf", "to_hf")]
        if "before" in names:
            cells.append("yes" if r["same_checkpoint"] and r["same_hf_files"] else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"convert_memory_{date}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
