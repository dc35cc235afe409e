"""The DeepSeekMoE paper's comparisons at CPU scale, over several seeds, with statistics.

    python examples/compare_baselines.py                     # the full experiment
    python examples/compare_baselines.py --measure           # CPU seconds per step, extrapolated
    python examples/compare_baselines.py --data-path PREFIX  # on your own (preprocessed) data
    python examples/compare_baselines.py --seeds 11 22 33 --jobs 2 train_iters=1600 lr=4e-3
    python examples/compare_baselines.py --language-words-per-class 64 --corpus-tokens 9000000

Models (all from yaml_configs/tiny_ablation.yaml, the GShard baseline of N experts of width W,
top-K): dense (FFN K*W), Switch (top-1 of N/K experts of width K*W), GShard, and the paper's
ablation (Figure 3): + shared expert isolation, + fine-grained segmentation m=2, m=4
(``config.derive_from_baseline``, one shared expert). Every model has the same activated FFN
width per token (K*W) and every MoE model the same total expert width (N*W).

Each model is trained once per seed with dsmoe-train on a synthetic many-domain corpus
(``dsmoe_megatron.synthetic``, generated once into runs/compare/data) or your data, for a
single epoch at most: the script refuses a corpus too small for that. A seed fixes the
initialisation, the order of the training data and the validation batches, so the models of
one seed see the same data and their differences pair up across seeds. Then every MoE model is
analysed with dsmoe-analyze (expert load, top-p experts disabled, shared experts removed).

Results go to benchmarks/results/paper_ablation{_table.md,.json,.png,_redundancy.png,
_expert_load.png} (``--results``), replacing earlier ones (there: the recorded results) only
with ``--force``; runs (checkpoints, metrics.jsonl, analyses) to runs/compare/. Runs that
already finished are reused, interrupted ones resume from their last checkpoint; a run there
with other settings (overrides, data) is refused, not reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsmoe_megatron.analyze import draw_expert_load, pyplot  # noqa: E402
from dsmoe_megatron.cli import positive_int  # noqa: E402
from dsmoe_megatron.config import derive_from_baseline  # noqa: E402
from dsmoe_megatron.synthetic import (  # noqa: E402
    LanguageConfig,
    add_language_arguments,
    language_from_args,
    metadata_path,
    split_documents,
    split_stats,
    write_corpus,
)

BASE_CONFIG = ROOT / "yaml_configs" / "tiny_ablation.yaml"
RUNS = ROOT / "runs" / "compare"
RESULTS = ROOT / "benchmarks" / "results"
CORPUS_TOKENS = 6_000_000
# 16 words per class (not 64): a smaller long tail of rare words, so that these small models
# reach their plateau within the hour (with 64 the curves still fall steeply at the end).
LANGUAGE = LanguageConfig(words_per_class=16)
DEEPSEEKMOE = "fine4"
MODEL_KEYS = ("dense", "switch", "gshard", "shared", "fine2", DEEPSEEKMOE)  # models()'s order
# What one run writes to --results (--measure: the cost estimate only).
RESULT_FILES = ("paper_ablation.json", "paper_ablation_table.md", "paper_ablation.png",
                "paper_ablation_redundancy.png", "paper_ablation_expert_load.png")
COST_FILE = "paper_ablation_cost.json"


@dataclass
class Model:
    key: str
    label: str
    overrides: list[str] = field(default_factory=list)
    moe: bool = True


def _moe_fields(fields: dict) -> list[str]:
    sections = {"moe_num_shared_experts": "deepseekmoe"}
    return [f"{sections.get(k, 'language_model')}.{k}={v}" for k, v in fields.items()]


def models(run) -> list[Model]:
    """The compared models, derived from the base run config's GShard model."""
    n, k, w = (run.model.num_moe_experts, run.model.moe_router_topk,
               run.model.moe_ffn_hidden_size)

    def ablation(m: int, shared: int) -> list[str]:
        return _moe_fields(derive_from_baseline(w, n, k, segmentation=m, shared=shared))

    return [
        Model("dense", f"dense (FFN {k * w})", [
            "language_model.num_moe_experts=null", "language_model.moe_ffn_hidden_size=null",
            f"language_model.ffn_hidden_size={k * w}", "deepseekmoe.moe_num_shared_experts=0"],
            moe=False),
        Model("switch", f"Switch (top-1 of {n // k})", _moe_fields(dict(
            num_moe_experts=n // k, moe_router_topk=1, moe_ffn_hidden_size=k * w,
            moe_num_shared_experts=0))),
        Model("gshard", f"GShard (0+{k}/{n})", ablation(1, 0)),
        Model("shared", f"+ shared isolation (1+{k - 1}/{n - 1})", ablation(1, 1)),
        Model("fine2", f"+ fine-grained m=2 (1+{2 * k - 1}/{2 * n - 1})", ablation(2, 1)),
        Model(DEEPSEEKMOE, f"DeepSeekMoE m=4 (1+{4 * k - 1}/{4 * n - 1})", ablation(4, 1)),
    ]


# ---------------------------------------------------------------------------------------------
# Data


def corpus_prefix(tokens: int, language: LanguageConfig) -> str:
    """The synthetic corpus (generated on first use)."""
    from dsmoe_megatron.data import get_bin_path, get_idx_path

    digest = hashlib.sha256(json.dumps(asdict(language), sort_keys=True).encode()).hexdigest()
    prefix = RUNS / "data" / f"synthetic_{tokens}_{digest[:8]}"
    done = all(Path(p).exists() for p in (get_bin_path(str(prefix)), get_idx_path(str(prefix)),
                                          metadata_path(prefix)))
    if not done:
        print(f"generating the synthetic corpus ({tokens} tokens) into {prefix}", flush=True)
        write_corpus(prefix, tokens, language)
    return str(prefix)


def train_split_tokens(prefix: str, split: str) -> int:
    from dsmoe_megatron.data import open_indexed_dataset

    dataset = open_indexed_dataset(prefix)  # holds the memory map the lengths live in
    lengths = dataset.sequence_lengths
    return int(sum(int(lengths[i]) for i in split_documents(len(lengths), split)["train"]))


def check_single_epoch(run, prefix: str) -> dict:
    needed = run.train.train_iters * run.train.global_batch(1) * run.train.seq_length
    available = train_split_tokens(prefix, run.train.split)
    if needed > available:
        raise SystemExit(
            f"compare_baselines: {run.train.train_iters} steps x {run.train.global_batch(1)} x "
            f"{run.train.seq_length} = {needed} tokens, but the training split of {prefix} "
            f"holds {available}: a model would see tokens twice. Use more data "
            f"(--corpus-tokens, or a larger --data-path) or fewer train_iters.")
    return {"train_tokens_per_run": needed, "train_split_tokens": available,
            "epochs": needed / available}


# ---------------------------------------------------------------------------------------------
# Training and analysis runs


def run_dir(model: Model, seed: int) -> Path:
    return RUNS / f"{model.key}_s{seed}"


def _metrics(save: Path) -> list[dict]:
    path = save / "metrics.jsonl"
    if not path.exists():
        return []
    by_key = {}  # a resumed run logs some iterations twice: keep the last record of each
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_key[(record["iteration"], "valid_loss" in record)] = record
    return [by_key[k] for k in sorted(by_key)]


def _finished(save: Path, train_iters: int) -> bool:
    return any(r["iteration"] == train_iters and "valid_loss" in r for r in _metrics(save))


def _train_overrides(model: Model, seed: int, data_path: str, overrides: list[str]) -> list[str]:
    return [*model.overrides, f"seed={seed}", f"save={run_dir(model, seed)}",
            f"data_path=[{data_path}]", "tensorboard_dir=null", *overrides]


def _command(model: Model, seed: int, data_path: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "dsmoe_megatron.train", str(BASE_CONFIG),
            *_train_overrides(model, seed, data_path, overrides), "--resume", "auto"]


def _flat(doc: dict) -> dict:
    flat = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def settings_changed(model: Model, seed: int, data_path: str, overrides: list[str]) -> str | None:
    """How the run in run_dir(model, seed) (its run.yaml) differs from the one this command
    trains; None when it does not, or there is none yet. A finished run would otherwise be
    reported under settings it was not trained with, and an interrupted one would be resumed
    under them."""
    import yaml

    from dsmoe_megatron.checkpoint import RUN_CONFIG_NAME
    from dsmoe_megatron.yaml_config import load_run_config, run_config_to_dict

    saved = run_dir(model, seed) / RUN_CONFIG_NAME
    if not saved.exists():
        return None
    then = _flat(yaml.safe_load(saved.read_text()) or {})
    now = _flat(run_config_to_dict(load_run_config(
        BASE_CONFIG, _train_overrides(model, seed, data_path, overrides),
        instantiate_checks=False)))
    changed = [f"{key}: {then.get(key)} there, {now.get(key)} now"
               for key in sorted(then.keys() | now.keys()) if then.get(key) != now.get(key)]
    return "; ".join(changed) or None


def _environment() -> dict:
    # One thread per run: small models scale badly across threads; --jobs runs several.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_jobs(jobs: list[tuple[str, list[str], Path]], parallel: int) -> dict[str, float]:
    """Run (name, command, log) jobs, ``parallel`` at a time; returns CPU seconds per job."""
    pending, running, cpu = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, command, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                proc = subprocess.Popen(command, cwd=ROOT, env=_environment(), stdout=f,
                                        stderr=subprocess.STDOUT)
            running[proc.pid] = (name, log, time.time())
            print(f"started {name} (log {log})", flush=True)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        name, log, start = running.pop(pid)
        cpu[name] = usage.ru_utime + usage.ru_stime
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"compare_baselines: {name} failed; see {log}")
        print(f"finished {name}: {time.time() - start:.0f} s wall, {cpu[name]:.0f} s CPU",
              flush=True)
    return cpu


def train_all(run, model_list, seeds, data_path, overrides, parallel) -> dict[str, float]:
    for m in model_list:
        for s in seeds:
            changed = settings_changed(m, s, data_path, overrides)
            if changed:
                raise SystemExit(
                    f"compare_baselines: {run_dir(m, s)} holds a run with other settings "
                    f"({changed}); give these settings another --runs directory, or delete it")
    jobs = [(f"{m.key}_s{s}", _command(m, s, data_path, overrides), run_dir(m, s) / "train.log")
            for m in model_list for s in seeds
            if not _finished(run_dir(m, s), run.train.train_iters)]
    cpu = run_jobs(jobs, parallel)
    cpu_file = RUNS / "cpu_seconds.json"
    recorded = json.loads(cpu_file.read_text()) if cpu_file.exists() else {}
    recorded.update(cpu)
    cpu_file.write_text(json.dumps(recorded, indent=1))
    return recorded


def _analysed_with(path: Path) -> int | None:
    """The eval_iters of the analysis at ``path``; None without one."""
    return json.loads(path.read_text())["settings"]["eval_iters"] if path.exists() else None


def analyse_all(model_list, seeds, parallel, eval_iters: int) -> dict:
    jobs = []
    for m in model_list:
        for s in seeds:
            out = run_dir(m, s) / "analysis"
            # An analysis over another number of batches is redone, not reported as this one.
            if m.moe and _analysed_with(out / "analysis.json") != eval_iters:
                jobs.append((f"analyse {m.key}_s{s}", [
                    sys.executable, "-m", "dsmoe_megatron.analyze", str(run_dir(m, s)),
                    "--out", str(out), "--eval-iters", str(eval_iters), "--force"],
                    out / "analyze.log"))
    run_jobs(jobs, parallel)
    return {(m.key, s): json.loads((run_dir(m, s) / "analysis" / "analysis.json").read_text())
            for m in model_list if m.moe for s in seeds}


# ---------------------------------------------------------------------------------------------
# Statistics


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with df degrees of freedom (bisection on its CDF)."""
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, steps: int = 2000) -> float:  # Simpson's rule on [0, x]
        h = x / steps
        total = sum((1 if i in (0, steps) else 4 if i % 2 else 2)
                    * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1))
        return 0.5 + norm * total * h / 3

    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a: list[float], b: list[float]) -> dict:
    """mean(a - b) over paired seeds with its 95% t-interval."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95": None, "significant": False, "wins": None}
    half = t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "ci95": [mean - half, mean + half],
            "significant": mean + half < 0 or mean - half > 0,
            "a_better_in": sum(d < 0 for d in diffs), "seeds": len(diffs)}


def final_valid(save: Path) -> float:
    return [r for r in _metrics(save) if "valid_loss" in r][-1]["valid_loss"]


def summarise(model_list, seeds) -> dict:
    per_model = {}
    for m in model_list:
        finals = [final_valid(run_dir(m, s)) for s in seeds]
        curves = [[(r["iteration"], r["valid_loss"]) for r in _metrics(run_dir(m, s))
                   if "valid_loss" in r] for s in seeds]
        per_model[m.key] = {
            "label": m.label, "final_valid": finals, "mean": statistics.fmean(finals),
            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0, "valid_curves": curves,
            "train_curves": [[(r["iteration"], r["lm_loss"]) for r in _metrics(run_dir(m, s))
                              if "lm_loss" in r] for s in seeds],
        }
    keys = [m.key for m in model_list]
    pairs = {f"{a} vs {b}": paired_difference(per_model[a]["final_valid"],
                                              per_model[b]["final_valid"])
             for i, a in enumerate(keys) for b in keys[i + 1:]}
    return {"models": per_model, "pairs": pairs}


def flatness(curves: list[list[tuple[int, float]]]) -> dict:
    """How flat the validation curves end: the mean drop over the last quarter of training,
    absolute and as a share of the whole drop from the first evaluation."""
    drops, shares = [], []
    for curve in curves:
        last_iter, last = curve[-1]
        quarter = [v for it, v in curve if it <= 0.75 * last_iter][-1] - last
        drops.append(quarter)
        shares.append(quarter / (curve[0][1] - last))
    return {"drop": statistics.fmean(drops), "share_of_whole_drop": statistics.fmean(shares)}


# ---------------------------------------------------------------------------------------------
# Report


def redundancy_summary(model_list, seeds, analyses) -> dict:
    out = {}
    for m in model_list:
        if not m.moe:
            continue
        runs = [analyses[m.key, s] for s in seeds]
        points = [[p["loss"] for p in r["redundancy"]] for r in runs]
        rise = [[loss - row[0] for loss in row] for row in points]
        out[m.key] = {
            "fraction_of_routed": [p["fraction_of_routed"] for p in runs[0]["redundancy"]],
            "disabled_top": [p["disabled_top"] for p in runs[0]["redundancy"]],
            "loss_mean": [statistics.fmean(col) for col in zip(*points)],
            "rise_mean": [statistics.fmean(col) for col in zip(*rise)],
            "rise_std": [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*rise)],
            "max_over_mean_load": [max(row["max_over_mean"] for row in r["expert_load"])
                                   for r in runs],
            "shared_removed": [r.get("shared_removed") for r in runs],
        }
    return out


def plot(summary: dict, redundancy: dict, analyses: dict, seeds, model_list) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plots (pip install -e .[dev])")
        return
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (key, m) in enumerate(summary["models"].items()):
        iters = [it for it, _ in m["valid_curves"][0]]
        values = list(zip(*[[v for _, v in c] for c in m["valid_curves"]]))
        mean = [statistics.fmean(v) for v in values]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        for axis in (ax, zoom):
            axis.plot(iters, mean, "o-", ms=3, color=f"C{i}", label=m["label"])
            axis.fill_between(iters, [a - b for a, b in zip(mean, std)],
                              [a + b for a, b in zip(mean, std)], color=f"C{i}", alpha=0.2)
    half = max(it for it, _ in next(iter(summary["models"].values()))["valid_curves"][0]) / 2
    zoom.set_xlim(left=half)
    lows = [min(v for it, v in c if it >= half) for m in summary["models"].values()
            for c in m["valid_curves"]]
    highs = [max(v for it, v in c if it >= half) for m in summary["models"].values()
             for c in m["valid_curves"]]
    zoom.set_ylim(min(lows) - 0.01, max(highs) + 0.01)
    for axis, title in ((ax, "validation loss"), (zoom, "second half (zoom)")):
        axis.set_xlabel("iteration")
        axis.set_ylabel("validation loss (nats/byte)")
        axis.set_title(f"{title}: mean +- std over seeds {', '.join(map(str, seeds))}")
    zoom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "paper_ablation.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (key, r) in enumerate(redundancy.items()):
        label = summary["models"][key]["label"]
        x, mean, std = r["fraction_of_routed"], r["rise_mean"], r["rise_std"]
        ax.plot(x, mean, "o-", ms=3, color=f"C{i + 1}", label=label)
        ax.fill_between(x, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                        color=f"C{i + 1}", alpha=0.2)
    ax.set_xlabel("disabled top routed experts (fraction of routed experts)")
    ax.set_ylabel("validation loss rise")
    ax.set_title("Redundancy (paper Fig. 4): loss rise, mean +- std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "paper_ablation_redundancy.png", dpi=120)
    plt.close(fig)

    moe = [m for m in model_list if m.moe]
    fig, axes = plt.subplots(len(moe), 1, figsize=(12, 1.7 * len(moe) + 0.6), squeeze=False)
    for axis, m in zip(axes[:, 0], moe):
        draw_expert_load(fig, axis, analyses[m.key, seeds[0]]["expert_load"],
                         f"{m.label}: fraction of tokens per routed expert (seed {seeds[0]})")
    fig.tight_layout()
    fig.savefig(RESULTS / "paper_ablation_expert_load.png", dpi=110)
    plt.close(fig)


def write_results(run, summary, redundancy, data: dict, cpu: dict, seeds, model_list,
                  overrides) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    flat = {k: flatness(m["valid_curves"]) for k, m in summary["models"].items()}
    doc = {"config": str(BASE_CONFIG.relative_to(ROOT)), "overrides": overrides, "seeds": seeds,
           "train_iters": run.train.train_iters, "data": data, "cpu_seconds": cpu,
           "last_quarter_drop": flat, **summary, "redundancy": redundancy}
    (RESULTS / "paper_ablation.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["| model | final valid loss (mean +- std) | per seed | drop in last quarter "
             "(share of the whole drop) |", "| --- | --- | --- | --- |"]
    for key, m in summary["models"].items():
        lines.append(f"| {m['label']} | {m['mean']:.4f} +- {m['std']:.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in m['final_valid'])} | "
                     f"{flat[key]['drop']:.4f} ({flat[key]['share_of_whole_drop']:.1%}) |")
    lines += ["", "| pair (a vs b) | mean a - b | 95% t-interval | a better in | significant |",
              "| --- | --- | --- | --- | --- |"]
    for name, p in summary["pairs"].items():
        ci = "n/a" if p["ci95"] is None else f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"
        lines.append(f"| {name} | {p['mean']:+.4f} | {ci} | {p.get('a_better_in')}/"
                     f"{p.get('seeds')} | {'yes' if p['significant'] else 'no'} |")
    lines += ["", "| MoE model | loss rise, top experts disabled (p: rise) | loss rise, shared "
              "experts removed |", "| --- | --- | --- |"]
    for key, r in redundancy.items():
        rises = ", ".join(f"{p}: {v:+.3f}" for p, v in zip(r["disabled_top"], r["rise_mean"]))
        shared = [s for s in r["shared_removed"] if s]
        # A rise over the same analysis's own loss, as in the column before (not the loss).
        removed = (f"{statistics.fmean(s['loss'] for s in shared) - r['loss_mean'][0]:+.3f}"
                   if shared else "-")
        lines.append(f"| {summary['models'][key]['label']} | {rises} | {removed} |")
    (RESULTS / "paper_ablation_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Measuring the cost


def measure(run, model_list, data_path: str, overrides: list[str], seeds: list[int],
            short: int, long: int) -> dict:
    """CPU seconds per step of each model from two short runs (their difference removes the
    start-up), extrapolated to the whole experiment."""
    out = {}
    for m in model_list:
        cpu = []
        for iters in (short, long):
            save = RUNS / "measure" / f"{m.key}_{iters}"
            # --overwrite: the timing runs of an earlier --measure are only in the way.
            cmd = [sys.executable, "-m", "dsmoe_megatron.train", str(BASE_CONFIG), *m.overrides,
                   f"save={save}", f"data_path=[{data_path}]", "tensorboard_dir=null",
                   *overrides, f"train_iters={iters}", "lr_warmup_iters=1", "eval_interval=null",
                   "save_interval=null", "--overwrite"]
            log = save.with_name(f"{save.name}.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            with open(log, "w") as f:
                code = subprocess.run(cmd, cwd=ROOT, env=_environment(), stdout=f,
                                      stderr=subprocess.STDOUT).returncode
            if code:
                raise SystemExit(f"compare_baselines: measuring {m.key} failed; see {log}")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        per_step = (cpu[1] - cpu[0]) / (long - short)
        startup = cpu[0] - short * per_step
        out[m.key] = {"cpu_s_per_step": per_step, "startup_cpu_s": startup}
        print(f"{m.key}: {per_step:.3f} CPU s/step, start-up {startup:.0f} CPU s", flush=True)
    steps = run.train.train_iters
    evals = steps // (run.train.eval_interval or steps)
    # An evaluation batch is a forward only: about a third of a training step.
    per_run = {k: v["startup_cpu_s"] + v["cpu_s_per_step"] * (
        steps + evals * run.train.eval_iters / 3) for k, v in out.items()}
    total = sum(per_run.values()) * len(seeds)
    result = {"per_model": out, "train_iters": steps, "seeds": seeds,
              "extrapolated_cpu_s_per_run": per_run, "extrapolated_total_cpu_s": total,
              "extrapolated_hours_on_2_cores": total / 2 / 3600}
    print(f"extrapolated: {total:.0f} CPU s = {total / 7200:.2f} h on 2 idle cores")
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dsmoe-train key=value for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 22, 33])
    parser.add_argument("--models", nargs="+", default=None, choices=MODEL_KEYS,
                        help="a subset of the models")
    parser.add_argument("--jobs", type=positive_int, default=2,
                        help="runs at a time (one thread each)")
    parser.add_argument("--data-path", default=None, help="your indexed dataset prefix "
                        "(dsmoe-preprocess); default: the synthetic corpus")
    parser.add_argument("--corpus-tokens", type=positive_int, default=CORPUS_TOKENS)
    parser.add_argument("--analysis-eval-iters", type=positive_int, default=16)
    parser.add_argument("--runs", type=Path, default=RUNS, help="where runs and data go")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where results go")
    parser.add_argument("--force", action="store_true",
                        help="replace the results of an earlier comparison in --results")
    parser.add_argument("--measure", action="store_true",
                        help="only measure CPU s/step per model and extrapolate the total")
    add_language_arguments(parser.add_argument_group(
        "the synthetic language (dsmoe_megatron.synthetic.LanguageConfig)"), "language-", LANGUAGE)
    args = parser.parse_args(argv)
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if repeated:
        # The same run twice would count as two seeds: a narrower interval from no new data.
        parser.error(f"--seeds: {', '.join(map(str, repeated))} given more than once; "
                     "each seed is one independent run")
    args.language = language_from_args(args, "language-")
    try:
        args.language.check()
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> None:
    global RUNS, RESULTS
    args = parse_args(argv)
    RUNS, RESULTS = args.runs.resolve(), args.results.resolve()
    # Checked before the hour of training: the results of an earlier comparison (the recorded
    # ones, by default) are not replaced unasked.
    earlier = [name for name in ((COST_FILE,) if args.measure else RESULT_FILES)
               if (RESULTS / name).exists()]
    if earlier and not args.force:
        raise SystemExit(f"compare_baselines: {RESULTS} holds the results of an earlier "
                         f"comparison ({', '.join(earlier)}); pass --force to replace them or "
                         "choose another --results")

    from dsmoe_megatron.yaml_config import YamlConfigError, load_run_config, output_dir_problem

    for option, path in (("--runs", RUNS), ("--results", RESULTS)):
        problem = output_dir_problem(str(path))
        if problem:
            raise SystemExit(f"compare_baselines: {option} {path}: {problem}")
    try:
        run = load_run_config(BASE_CONFIG, args.overrides)
    except YamlConfigError as error:
        raise SystemExit(f"compare_baselines: {error}") from None
    train = run.train
    if not train.eval_interval or train.train_iters % train.eval_interval:
        # Else the last evaluation is before the end: reported as the final loss of a model
        # that trained on (or none at all), and the run never counts as finished.
        raise SystemExit(f"compare_baselines: eval_interval={train.eval_interval} must divide "
                         f"train_iters={train.train_iters}: the models are compared by their "
                         "validation loss at the last step")
    if train.train_iters < 2 * train.eval_interval:
        # The report also gives how much each loss still fell over the last quarter of training.
        raise SystemExit(f"compare_baselines: eval_interval={train.eval_interval} leaves one "
                         f"evaluation in train_iters={train.train_iters}; the report needs two "
                         "or more (how much the validation loss fell at the end): give an "
                         "eval_interval that divides train_iters at least twice")
    model_list = models(run)
    if args.models:
        model_list = [m for m in model_list if m.key in args.models]
    data_path = args.data_path or corpus_prefix(args.corpus_tokens, args.language)
    try:
        data = {"data_path": data_path, **check_single_epoch(run, data_path)}
    except FileNotFoundError as error:  # a --data-path without its .bin / .idx
        raise SystemExit(f"compare_baselines: --data-path: {error}") from None
    if args.data_path is None:

        meta = json.loads(Path(f"{data_path}.synthetic.json").read_text())
        data.update(language=meta["language"], splits=split_stats(data_path, run.train.split))
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.measure:
        result = measure(run, model_list, data_path, args.overrides, args.seeds, 10, 40)
        (RESULTS / COST_FILE).write_text(json.dumps(result, indent=1) + "\n")
        return
    cpu = train_all(run, model_list, args.seeds, data_path, args.overrides, args.jobs)
    analyses = analyse_all(model_list, args.seeds, args.jobs, args.analysis_eval_iters)
    summary = summarise(model_list, args.seeds)
    redundancy = redundancy_summary(model_list, args.seeds, analyses)
    write_results(run, summary, redundancy, data, cpu, args.seeds, model_list, args.overrides)
    plot(summary, redundancy, analyses, args.seeds, model_list)


if __name__ == "__main__":
    main()
