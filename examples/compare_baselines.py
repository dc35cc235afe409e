"""Train DeepSeekMoE, a GShard-style top-2 MoE and a dense model at equal activated compute.

    python examples/compare_baselines.py [train_iters=400 ...]

Runs dsmoe-train on yaml_configs/tiny.yaml, tiny_gshard.yaml and tiny_dense.yaml with the same
data, seed and schedule, then writes benchmarks/results/tiny_loss_curves.{json,md,png}
(the plot needs matplotlib: pip install -e .[dev]).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"DeepSeekMoE": "tiny.yaml", "GShard top-2": "tiny_gshard.yaml", "dense": "tiny_dense.yaml"}


def train(config: str, save: Path, overrides: list[str]) -> list[dict]:
    subprocess.run([sys.executable, "-m", "dsmoe_megatron.train", str(ROOT / "yaml_configs" / config),
                    f"save={save}", "tensorboard_dir=null", *overrides], check=True, cwd=ROOT)
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


def main(overrides: list[str]) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for name, config in MODELS.items():
        save = ROOT / "runs" / "compare" / config.removesuffix(".yaml")
        if (save / "metrics.jsonl").exists():
            (save / "metrics.jsonl").unlink()
        records = train(config, save, overrides)
        curves[name] = {
            "train": [(r["iteration"], r["lm_loss"]) for r in records if "lm_loss" in r],
            "valid": [(r["iteration"], r["valid_loss"]) for r in records if "valid_loss" in r],
        }
    (out / "tiny_loss_curves.json").write_text(json.dumps(
        {"overrides": overrides, "curves": curves}, indent=1))
    lines = ["| model | final train loss | final valid loss | best valid loss |",
             "| --- | --- | --- | --- |"]
    for name, c in curves.items():
        lines.append(f"| {name} | {c['train'][-1][1]:.4f} | {c['valid'][-1][1]:.4f} | "
                     f"{min(v for _, v in c['valid']):.4f} |")
    (out / "tiny_loss_curves.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        line, = ax.plot(*zip(*c["train"]), label=f"{name} (train)")
        ax.plot(*zip(*c["valid"]), "o--", color=line.get_color(), label=f"{name} (valid)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("LM loss (byte-level)")
    ax.set_title("Tiny models at equal activated compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tiny_loss_curves.png", dpi=120)


if __name__ == "__main__":
    main(sys.argv[1:])
