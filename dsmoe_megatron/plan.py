"""dsmoe-plan: parameters, compute, per-GPU memory and step time of a run config, and a search
over parallel layouts; nothing is built.

    dsmoe-plan yaml_configs/deepseekmoe_16b.yaml --gpus 128 --gpu H100-80GB
    dsmoe-plan yaml_configs/deepseekmoe_145b.yaml --gpus 1024 --search --min-headroom 0.1
    dsmoe-plan yaml_configs/tiny.yaml language_model.num_layers=8 --json
    python -m dsmoe_megatron.plan CONFIG [overrides] [--json] [--gpus N] [--gpu GPU] [--search]

How parameters and FLOPs are counted: planning/params.py; memory: planning/memory.py and
planning/activations.py; step time: planning/step_time.py; the search: planning/search.py; GPUs:
planning/hardware.py. The output states every assumption it rests on.

Exit status: 0 when the layout fits (with --search: when one fits), 1 when it does not, 2 for a
config or option that cannot be used.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import textwrap
from dataclasses import replace

from dsmoe_megatron.cli import positive_int, quiet_warnings, quiet_when_run_as_main

quiet_when_run_as_main(__name__)

from dsmoe_megatron.config import ConfigError  # noqa: E402
from dsmoe_megatron.planning.estimate import estimate  # noqa: E402
from dsmoe_megatron.planning.hardware import GB, GPUS, Cluster, get_gpu  # noqa: E402
from dsmoe_megatron.planning.memory import MemoryOptions, memory_assumptions  # noqa: E402
from dsmoe_megatron.planning.params import (  # noqa: E402
    FLOPS_CONVENTION,
    NOMINAL_CONVENTION,
    TOKENS_4K,
    bytes_per_weight,
    count_params,
    flops_per_token,
    nominal_flops_per_token,
)
from dsmoe_megatron.planning.search import search  # noqa: E402
from dsmoe_megatron.planning.step_time import COMPONENTS, Rates  # noqa: E402
from dsmoe_megatron.yaml_config import (  # noqa: E402
    RunConfig,
    check_world_size,
    load_run_config,
)

DEFAULT_GPU = "H100-80GB"


def minimal_world_size(run: RunConfig) -> int:
    """The smallest world the layout fits (no data parallelism beyond what EP needs)."""
    cfg = run.model
    t, p = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    etp = cfg.expert_tensor_parallel_size or t
    return math.lcm(t * p, etp * cfg.expert_model_parallel_size * p)


def model_summary(run: RunConfig) -> dict:
    """Parameters and training FLOPs (layout-independent)."""
    cfg, train = run.model, run.train
    params = count_params(cfg, train.vocab_size)
    per_token = flops_per_token(cfg, params.padded_vocab_size, train.seq_length)
    nominal = nominal_flops_per_token(cfg, params.vocab_size, train.seq_length)
    pattern = cfg.moe_layer_pattern()
    checkpoint = params.total * (bytes_per_weight(cfg) + CHECKPOINT_OPTIMIZER_BYTES)
    return {
        "total_params": params.total,
        "activated_params": params.activated,
        "non_embedding_params": params.total - params.embedding - params.output_layer,
        "params": {name: {"total": tot, "activated": act}
                   for name, (tot, act) in params.breakdown().items()},
        "vocab_size": params.vocab_size,
        "padded_vocab_size": params.padded_vocab_size,
        "num_layers": cfg.num_layers,
        "num_moe_layers": sum(pattern),
        "seq_length": train.seq_length,
        "flops_per_token": per_token,
        "flops_per_4k_tokens": per_token * TOKENS_4K,
        "flops_per_sequence": per_token * train.seq_length,
        "nominal_flops_per_token": nominal,
        "nominal_flops_per_4k_tokens": nominal * TOKENS_4K,
        "flops_convention": FLOPS_CONVENTION,
        "nominal_flops_convention": NOMINAL_CONVENTION,
        "checkpoint_bytes": checkpoint,
        # keep_checkpoints=N: a save writes the next one beside the N kept, then deletes the
        # oldest (and waits for an earlier deletion first). null: every checkpoint stays.
        "keep_checkpoints": train.keep_checkpoints,
        "checkpoints_peak_bytes": (checkpoint * (train.keep_checkpoints + 1)
                                   if train.keep_checkpoints else None),
    }


# What a dsmoe-train checkpoint holds per parameter besides the weights: Adam's fp32 master
# weights and two moments (Megatron's fully_reshardable optimizer state), fp32 models too.
CHECKPOINT_OPTIMIZER_BYTES = 12


def _run_settings(run: RunConfig, options: MemoryOptions,
                  rates: Rates) -> tuple[MemoryOptions, Rates]:
    """``options`` and ``rates`` with the run's use_distributed_optimizer (off: every rank holds
    the whole Adam state) and overlap_grad_reduce where the caller left them None (a null
    overlap_grad_reduce stays None: overlapped, as dsmoe-train runs on GPUs)."""
    if options.distributed_optimizer is None:
        options = replace(options, distributed_optimizer=run.train.use_distributed_optimizer)
    if rates.overlap_grad_reduce is None:
        rates = replace(rates, overlap_grad_reduce=run.train.overlap_grad_reduce)
    return options, rates


def make_plan(run: RunConfig, world_size: int | None = None, gpu: str = DEFAULT_GPU,
              gpus_per_node: int = 8, options: MemoryOptions = MemoryOptions(),
              rates: Rates = Rates()) -> dict:
    """The model summary plus memory, fit and step time of the run's own layout."""
    cfg, train = run.model, run.train
    options, rates = _run_settings(run, options, rates)
    defaulted = world_size is None
    if defaulted:
        world_size = minimal_world_size(run)
    dp = check_world_size(run, world_size)
    cluster = Cluster(get_gpu(gpu), world_size, gpus_per_node)
    plan = model_summary(run)
    params = count_params(cfg, train.vocab_size)
    est = estimate(cfg, params, cluster, train.seq_length, train.micro_batch_size,
                   train.global_batch(dp), options, rates,
                   model_flops_per_token=plan["flops_per_token"])
    memory = dict(_jsonable(est.memory), world_size_defaulted=defaulted,
                  assumptions=memory_assumptions(cfg, est.memory["distributed_optimizer"],
                                                 options))
    plan.update({
        "tokens_per_step": train.global_batch(dp) * train.seq_length,
        "layout": _layout(run),
        "memory": memory,
        "fit": {"gpu": cluster.gpu.name, "gpu_memory": est.gpu_memory, "fits": est.fits,
                "headroom": est.headroom},
        "step_time": dict(est.time, assumptions=rates.describe(
            bool(cfg.fp8) and options.impl == "te", cluster.gpu.link)),
    })
    plan["flops_per_step"] = plan["flops_per_token"] * plan["tokens_per_step"]
    return plan


def _jsonable(memory: dict) -> dict:
    return dict(memory, stages=[stage.as_dict() for stage in memory["stages"]])


def _layout(run: RunConfig) -> dict:
    cfg = run.model
    return {
        "tensor": cfg.tensor_model_parallel_size,
        "pipeline": cfg.pipeline_model_parallel_size,
        "virtual_pipeline": cfg.virtual_pipeline_model_parallel_size,
        "expert": cfg.expert_model_parallel_size,
        "expert_tensor": cfg.expert_tensor_parallel_size,
        "sequence_parallel": cfg.sequence_parallel,
        "micro_batch_size": run.train.micro_batch_size,
        "recompute": _recompute(cfg),
    }


def _recompute(cfg) -> str:
    if cfg.recompute_granularity == "full":
        return f"full ({cfg.recompute_method}, {cfg.recompute_num_layers} layer(s))"
    if cfg.recompute_granularity == "selective":
        return f"selective ({', '.join(cfg.recompute_modules or ())})"
    return "none"


def search_plan(run: RunConfig, world_size: int, gpu: str = DEFAULT_GPU, gpus_per_node: int = 8,
                top: int = 10, min_headroom: float = 0.0, options: MemoryOptions = MemoryOptions(),
                rates: Rates = Rates()) -> dict:
    """The model summary plus the ``top`` fastest layouts that fit ``world_size`` GPUs."""
    cluster = Cluster(get_gpu(gpu), world_size, gpus_per_node)
    options, rates = _run_settings(run, options, rates)
    result = search(run, cluster, top, min_headroom, options, rates)
    ranked = []
    for r in result.pop("ranked"):
        est = r.estimate
        memory = _jsonable(est.memory)
        ranked.append({"layout": r.layout.describe(world_size),
                       "overrides": r.layout.overrides(run), "fits": est.fits,
                       "headroom": est.headroom, "gpu_memory": est.gpu_memory,
                       "memory": memory, "step_time": est.time})
    plan = model_summary(run)
    plan["search"] = dict(result, ranked=ranked, min_headroom=min_headroom,
                          memory_assumptions=memory_assumptions(
                              run.model, options.distributed_optimizer, options),
                          time_assumptions=rates.describe(
                              bool(run.model.fp8) and options.impl == "te", cluster.gpu.link))
    return plan


# ---------------------------------------------------------------------------------------------
# Text output


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{prefix}{unit}"
    return f"{value:.4g}{unit}"


def _params(value: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3f}{suffix}"
    return str(value)


def _gb(value: float) -> str:
    return f"{value / GB:.1f}" if value >= 0.1 * GB else f"{value / GB:.3f}"


def _wrap(text: str, first: str = "  - ", rest: str = "    ") -> list[str]:
    return textwrap.wrap(text, 96, initial_indent=first, subsequent_indent=rest)


def format_model(plan: dict, config_path: str) -> list[str]:
    lines = [f"dsmoe-plan: {config_path}", ""]
    dense = plan["num_layers"] - plan["num_moe_layers"]
    lines.append(f"Model: {plan['num_layers']} layers ({dense} dense + "
                 f"{plan['num_moe_layers']} MoE), vocabulary {plan['vocab_size']} "
                 f"(padded to {plan['padded_vocab_size']}), sequence {plan['seq_length']}")
    lines.append("")
    lines.append(f"{'Parameters':<22}{'total':>16}{'activated/token':>18}")
    for name, row in plan["params"].items():
        if row["total"]:
            lines.append(f"  {name:<20}{_params(row['total']):>16}{_params(row['activated']):>18}")
    lines.append(f"  {'all':<20}{_params(plan['total_params']):>16}"
                 f"{_params(plan['activated_params']):>18}")
    lines += _wrap(
        f"({plan['total_params']:,} total, {plan['activated_params']:,} activated; untied "
        "embedding and output layer, padded vocabulary rows included; activated = all but the "
        "routed experts a token does not visit)", "  ", "   ")
    keep = plan["keep_checkpoints"]
    lines += _wrap(f"checkpoint: {_si(plan['checkpoint_bytes'], 'B')} on disk, all ranks' "
                   f"shards together ({plan['checkpoint_bytes'] // plan['total_params']} bytes "
                   "per parameter: the weights, and Adam's fp32 master weights and moments); "
                   + (f"keep_checkpoints={keep}: up to {keep + 1} at once while a save runs, "
                      f"{_si(plan['checkpoints_peak_bytes'], 'B')}" if keep else
                      "every one is kept: keep_checkpoints: N keeps the newest N"), "  ", "   ")
    lines.append("")
    lines.append("Training compute")
    lines.append(f"  per token            {_si(plan['flops_per_token'], 'FLOPs')}")
    lines.append(f"  per 4K tokens        {_si(plan['flops_per_4k_tokens'], 'FLOPs')}"
                 f"   (attention at sequence {plan['seq_length']})")
    lines.append(f"  per sequence         {_si(plan['flops_per_sequence'], 'FLOPs')}"
                 f"   ({plan['seq_length']} tokens)")
    if "flops_per_step" in plan:
        lines.append(f"  per step             {_si(plan['flops_per_step'], 'FLOPs')}"
                     f"   ({plan['tokens_per_step']:,} tokens)")
    lines.append(f"  nominal per 4K       {_si(plan['nominal_flops_per_4k_tokens'], 'FLOPs')}")
    lines += _wrap(f"counted as: {plan['flops_convention']}", "  ")
    lines += _wrap(f"nominal: {plan['nominal_flops_convention']}", "  ")
    return lines


def format_memory(mem: dict, layout: str) -> list[str]:
    lines = [f"Memory per GPU (GB): {layout}; {mem['num_microbatches']} micro-batches per step",
             f"  {'stage':>5}{'layers':>7}{'params':>11}{'weights':>9}{'grads':>7}{'optim':>7}"
             f"{'activ':>7}{'trans':>7}{'allow':>7}{'total':>7}  in flight"]
    for st in mem["stages"]:
        lines.append(
            f"  {st['stage']:>5}{st['layers']:>7}{_params(st['params']):>11}"
            f"{_gb(st['weights'] + st['fp8_weights']):>9}{_gb(st['grads']):>7}"
            f"{_gb(st['optimizer']):>7}{_gb(st['activations']):>7}{_gb(st['transient']):>7}"
            f"{_gb(st['allowance']):>7}{_gb(st['total']):>7}  "
            + "+".join(map(str, st["in_flight"])))
    return lines


def format_time(time: dict) -> list[str]:
    step = time["step_time"]
    lines = [f"Step time on {time['num_gpus']} x {time['gpu']} ({time['num_nodes']} node(s)): "
             f"{step:.2f} s; {time['tokens_per_second_per_gpu']:,.0f} tokens/s/GPU, "
             f"{time['model_tflops_per_gpu']:.0f} model TFLOP/s/GPU, MFU "
             f"{time['mfu']:.1%} (of the BF16 peak)"]
    gpu = GPUS[time["gpu"]]
    link = gpu.link  # the keys say NVLink (JSON); the text names the node's link
    if link != "NVLink":
        lines += _wrap(f"{gpu.name} has no NVLink across the node: its GPUs talk over "
                       f"{gpu.intra_node_link}, {_gb(gpu.nvlink_bandwidth)} GB/s per "
                       "direction", "  ", "  ")
    for key in COMPONENTS:
        value = time["breakdown"].get(key, 0.0)
        if value:
            lines.append(f"  {key.replace('NVLink', link):<26}{value:>9.3f} s  "
                         f"{value / step:>6.1%}")
    a2a = time["ep_alltoall_bytes_per_step"]
    if a2a["nvlink"] or a2a["network"]:
        lines.append(f"  EP all-to-all bytes per GPU and step: {_gb(a2a['nvlink'])} GB over "
                     f"{link}, {_gb(a2a['network'])} GB over the network (slowest stage "
                     f"{time['slowest_stage']})")
    return lines


def _layout_text(plan: dict) -> str:
    lay, mem = plan["layout"], plan["memory"]
    vpp = f" x VPP{lay['virtual_pipeline']}" if lay["virtual_pipeline"] else ""
    return (f"world {mem['world_size']} = TP{lay['tensor']} x PP{lay['pipeline']}{vpp} x "
            f"DP{mem['data_parallel_size']}; EP{lay['expert']} x ETP{lay['expert_tensor']}, "
            f"expert DP {mem['expert_data_parallel_size']}; SP "
            f"{'on' if lay['sequence_parallel'] else 'off'}; micro-batch "
            f"{lay['micro_batch_size']}; recompute {lay['recompute']}")


def format_plan(plan: dict, config_path: str) -> str:
    lines = format_model(plan, config_path) + [""]
    mem, fit = plan["memory"], plan["fit"]
    lines += format_memory(mem, _layout_text(plan))
    if fit["fits"]:
        lines.append(f"  peak {_gb(mem['max_bytes_per_gpu'])} GB on stage {mem['max_stage']}: "
                     f"fits {fit['gpu']} ({_gb(fit['gpu_memory'])} GB) with "
                     f"{fit['headroom']:.0%} headroom")
    else:
        lines.append(f"  peak {_gb(mem['max_bytes_per_gpu'])} GB on stage {mem['max_stage']}: "
                     f"does NOT fit {fit['gpu']} ({_gb(fit['gpu_memory'])} GB); try "
                     "--search, recompute, or more GPUs")
    if mem.get("world_size_defaulted"):
        lines += _wrap("world size: the smallest this layout fits (least optimizer sharding); "
                       "pass --gpus for your cluster")
    for note in mem["assumptions"]:
        lines += _wrap(note)
    lines.append("")
    lines += format_time(plan["step_time"])
    for note in plan["step_time"]["assumptions"]:
        lines += _wrap(note)
    return "\n".join(lines)


def format_search(plan: dict, config_path: str, overrides: list[str]) -> str:
    result = plan["search"]
    lines = format_model(plan, config_path) + [""]
    need = f" with >= {result['min_headroom']:.0%} headroom" if result["min_headroom"] else ""
    lines.append(f"Layouts for {result['num_gpus']} x {result['gpu']} "
                 f"({result['gpus_per_node']} per node), global batch "
                 f"{result['global_batch_size']}: {result['candidates']} candidates, "
                 f"{result['fit']} fit{need}, {result['rejected_by_validation']} of the fastest "
                 "refused by the config validation")
    if not result["candidates"]:
        nearby = " or ".join(map(str, result["nearby_gpus"]))
        lines.append(f"  no layout: no data-parallel size possible on {result['num_gpus']} GPUs "
                     f"(GPUs / (TP x PP), with a PP that splits the {plan['num_layers']} layers) "
                     f"divides the global batch {result['global_batch_size']}; use --gpus "
                     f"{nearby}, or another global_batch_size")
        return "\n".join(lines)
    if not result["ranked"]:
        free = result["most_free"]
        lines.append(
            "  none fits" + need
            + (f" that the config validation accepts (it refused the {result['fit']} that do)"
               if result["fit"] else "")
            + ": more GPUs, a larger GPU, or a smaller model"
            + (f"; the roomiest layout it accepts leaves {math.floor(free * 100)}% free, so a "
               "--min-headroom up to that finds it" if free is not None else ""))
        return "\n".join(lines)
    lines.append(f"  {'#':>2}  {'layout':<60}{'step s':>8}{'tok/s/GPU':>11}{'MFU':>7}"
                 f"{'peak GB':>9}{'free':>6}")
    for i, r in enumerate(result["ranked"], 1):
        t = r["step_time"]
        lines.append(f"  {i:>2}  {r['layout']:<60}{t['step_time']:>8.2f}"
                     f"{t['tokens_per_second_per_gpu']:>11,.0f}{t['mfu']:>7.1%}"
                     f"{_gb(r['memory']['max_bytes_per_gpu']):>9}{r['headroom']:>6.0%}")
    lines.append("  (e+l): the pipeline split counts the embedding and the loss as layers")
    best = result["ranked"][0]
    lines.append("")
    lines.append(f"Best: {best['layout']}")
    lines += format_time(best["step_time"])
    lines.append("")
    lines.append("Train it (these overrides after yours, or put them in the YAML):")
    gpus, per_node = result["num_gpus"], result["gpus_per_node"]
    args = [*overrides, *best["overrides"]]
    if gpus == 1:
        command = ["dsmoe-train", config_path, *args, "--resume", "auto"]
    elif gpus <= per_node:  # one process per GPU: dsmoe-train alone would be a world of one
        command = ["torchrun", "--nproc-per-node", str(gpus), "-m", "dsmoe_megatron.train",
                   config_path, *args, "--resume", "auto"]
    else:  # the cluster launcher adds --resume auto; it asks SLURM for 8 GPUs a node
        node = [] if per_node == 8 else [f"GPUS_PER_NODE={per_node}"]
        command = [f"CONFIG={config_path}", *node, "sbatch", "--nodes", str(-(-gpus // per_node)),
                   *(["--gpus-per-node", str(per_node)] if node else []),
                   "examples/slurm_145b.sbatch", *args]
    wrapped = textwrap.wrap(shlex.join(command), 94, initial_indent="  ",
                            subsequent_indent="      ", break_on_hyphens=False)
    lines += [line + " \\" for line in wrapped[:-1]] + wrapped[-1:]  # pastes as one command
    lines.append("")
    lines.append("Assumptions:")
    for note in result["memory_assumptions"] + result["time_assumptions"]:
        lines += _wrap(note)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dsmoe-plan",
        description="Parameters, training FLOPs, per-GPU memory and step time of a "
                    "dsmoe_megatron run config; --search ranks the parallel layouts that fit.")
    parser.add_argument("config", help="run config YAML (e.g. yaml_configs/deepseekmoe_16b.yaml)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="key=value overrides (language_model.num_layers=4, lr=1e-3, ...)")
    parser.add_argument("--gpus", "--world-size", dest="gpus", type=positive_int, default=None,
                        help="number of GPUs (default: the smallest world the layout fits; "
                             "--search needs it)")
    parser.add_argument("--gpu", default=DEFAULT_GPU, help=f"GPU type: {', '.join(GPUS)} "
                                                           f"(default {DEFAULT_GPU})")
    parser.add_argument("--gpus-per-node", type=positive_int, default=8, help="default 8")
    parser.add_argument("--search", action="store_true",
                        help="rank every layout of the model that fits --gpus GPUs")
    parser.add_argument("--top", type=positive_int, default=None,
                        help="layouts --search prints (default 10)")
    parser.add_argument("--min-headroom", type=float, default=None,
                        help="--search: keep layouts that leave this share of the GPU's memory "
                             "free after the allowance (e.g. 0.1)")
    parser.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction,
                        help="time the gradient reduction as overlapped with the backward, or "
                             "not (default: the config's overlap_grad_reduce; null: "
                             "overlapped, as dsmoe-train runs on GPUs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_intermixed_args(quiet_warnings(argv))
    rates = Rates(overlap_grad_reduce=args.overlap_grad_reduce)
    try:
        if args.search and args.gpus is None:
            raise ConfigError("--search needs --gpus N (the GPUs to lay the model out on)")
        # without --search they would be ignored, and a plan without the headroom asked for
        # would still exit 0
        for flag, value in (("--top", args.top), ("--min-headroom", args.min_headroom)):
            if value is not None and not args.search:
                raise ConfigError(f"{flag} applies to --search only; add --search")
        min_headroom = args.min_headroom or 0.0
        if not 0 <= min_headroom < 1:
            raise ConfigError(f"--min-headroom {args.min_headroom} must be in [0, 1)")
        run = load_run_config(args.config, args.overrides, instantiate_checks=False)
        if args.search:
            plan = search_plan(run, args.gpus, args.gpu, args.gpus_per_node, args.top or 10,
                               min_headroom, rates=rates)
            fits = bool(plan["search"]["ranked"])
        else:
            plan = make_plan(run, args.gpus, args.gpu, args.gpus_per_node, rates=rates)
            fits = plan["fit"]["fits"]
    except ValueError as err:
        print(f"dsmoe-plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan))
    elif args.search:
        print(format_search(plan, args.config, args.overrides))
    else:
        print(format_plan(plan, args.config))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
