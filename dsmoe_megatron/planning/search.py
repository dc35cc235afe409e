"""dsmoe-plan --search: the layouts of a run config on N GPUs, those that fit, fastest first.

Candidates: every TP (within a node), PP, VPP, EP, expert TP (1 or TP), SP, micro-batch size
and recompute choice that divides the world and the global batch; DP is what is left. Uneven
layer counts are tried with Megatron's "embedding and loss count as layers" split. Each
candidate is estimated on a copy of the config (estimate.py); the ones that fit are ranked by
step time (then peak memory) and, in that order, built from the YAML with the candidate's
overrides through the project's own loader and checks (``run_config_from_dict`` +
``check_world_size``) until ``top`` have passed: a layout the config validation rejects is
never returned.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from dsmoe_megatron.config import DeepSeekMoEConfig
from dsmoe_megatron.planning.estimate import Estimate, estimate
from dsmoe_megatron.planning.hardware import Cluster
from dsmoe_megatron.planning.memory import MemoryOptions
from dsmoe_megatron.planning.params import ParamCount, count_params, flops_per_token
from dsmoe_megatron.planning.step_time import Rates
from dsmoe_megatron.runtime import ParallelLayout
from dsmoe_megatron.yaml_config import (
    RunConfig,
    YamlConfigError,
    check_world_size,
    run_config_from_dict,
    section_of,
)

MICRO_BATCH_SIZES = (1, 2, 4)
VIRTUAL_STAGES = (None, 2, 4, 8)


def recompute_choices(layers_per_chunk: int) -> dict[str, dict]:
    """Recompute settings the search tries (TransformerConfig fields), by name: none,
    selective recompute of the MLPs (the whole DeepSeekMoE block in MoE layers), full
    recompute of every layer, or of the first 1/4, 1/2, 3/4 of each chunk's layers."""
    off = dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
               recompute_modules=None)
    choices = {"none": off,
               "selective-mlp": dict(off, recompute_granularity="selective",
                                     recompute_modules=("mlp",)),
               "full": dict(off, recompute_granularity="full", recompute_method="uniform",
                            recompute_num_layers=1)}
    for n in sorted({math.ceil(layers_per_chunk * f) for f in (0.25, 0.5, 0.75)}):
        if 0 < n < layers_per_chunk:
            choices[f"full-block-{n}"] = dict(off, recompute_granularity="full",
                                              recompute_method="block", recompute_num_layers=n)
    return choices


@dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    virtual_pipeline: int | None
    expert: int
    expert_tensor: int
    sequence_parallel: bool
    micro_batch_size: int
    recompute: str
    recompute_fields: tuple
    embedding_and_loss_as_layers: bool

    def model_fields(self) -> dict:
        split = self.embedding_and_loss_as_layers
        parallel = ParallelLayout(self.tensor, self.pipeline, self.expert, self.expert_tensor,
                                  self.virtual_pipeline, self.sequence_parallel)
        return dict(
            parallel.config_fields(),
            account_for_embedding_in_pipeline_split=split,
            account_for_loss_in_pipeline_split=split,
            num_layers_in_first_pipeline_stage=None,
            num_layers_in_last_pipeline_stage=None,
            pipeline_model_parallel_layout=None,
            microbatch_group_size_per_vp_stage=None,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in self.recompute_fields})

    def overrides(self, run: RunConfig) -> list[str]:
        """key=value overrides that turn ``run`` into this layout (the fields that differ;
        recompute_modules only for selective recompute: Megatron fills it in, ['core_attn'],
        and reads it under nothing else)."""
        fields = self.model_fields()
        skip = {"microbatch_group_size_per_vp_stage"}
        if fields["recompute_granularity"] != "selective":
            skip.add("recompute_modules")
        out = [f"{section_of(k)}.{k}={_yaml(v)}" for k, v in fields.items()
               if k not in skip and getattr(run.model, k) != v]
        if run.train.micro_batch_size != self.micro_batch_size:
            out.append(f"micro_batch_size={self.micro_batch_size}")
        return out

    def describe(self, world: int) -> str:
        dp = world // (self.tensor * self.pipeline)
        split = "(e+l)" if self.embedding_and_loss_as_layers else ""
        parts = [f"TP{self.tensor}", f"PP{self.pipeline}{split}"]
        if self.virtual_pipeline:
            parts.append(f"VPP{self.virtual_pipeline}")
        parts += [f"EP{self.expert}", f"ETP{self.expert_tensor}", f"DP{dp}"]
        if self.sequence_parallel:
            parts.append("SP")
        parts += [f"mbs{self.micro_batch_size}", f"recompute={self.recompute}"]
        return " ".join(parts)


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(value) + "]"
    return str(value)


def _divisors(n: int, at_most: int | None = None) -> list[int]:
    return [d for d in range(1, min(n, at_most or n) + 1) if n % d == 0]


def pipeline_splits(layers: int, pp: int) -> tuple[bool, ...]:
    """The splits Megatron can make of ``layers`` over ``pp`` stages: evenly (False) and/or
    counting the embedding and the loss as layers (True); none when neither divides."""
    return tuple(split for split in ((False, True) if pp > 1 else (False,))
                 if (layers + 2 * split) % pp == 0)


def candidates(cfg: DeepSeekMoEConfig, world: int, gpus_per_node: int,
               global_batch: int) -> list[list[Layout]]:
    """Every layout that divides the world and the global batch (the rest is for the config
    validation to judge), grouped by parallel layout; each group starts with its least
    memory-hungry member (full recompute, smallest micro-batch)."""
    layers, experts = cfg.num_layers, cfg.num_moe_experts or 1
    groups = []
    for tp in (d for d in _divisors(gpus_per_node) if world % d == 0):
        for pp in _divisors(world // tp, layers):
            dp = world // (tp * pp)
            batches = [b for b in MICRO_BATCH_SIZES if global_batch % (b * dp) == 0]
            for split in pipeline_splits(layers, pp):
                per_stage = (layers + 2 * split) / pp
                for vpp in VIRTUAL_STAGES:
                    if vpp and (pp == 1 or per_stage / vpp < 1):
                        continue
                    if split and pp == 2 and not vpp:
                        continue  # two stages of layers / 2 either way: the even split again
                    recompute = recompute_choices(max(1, int(per_stage // (vpp or 1))))
                    for etp in sorted({1, tp}):
                        for ep in (d for d in _divisors(experts) if world % (d * etp * pp) == 0):
                            for sp in (False, True) if tp > 1 else (False,):
                                group = [Layout(tp, pp, vpp, ep, etp, sp, mbs, name,
                                                tuple(fields.items()), split)
                                         for name, fields in recompute.items()
                                         for mbs in batches]
                                group.sort(key=lambda x: (x.recompute != "full",
                                                          x.micro_batch_size))
                                if group:
                                    groups.append(group)
    return groups


def nearby_worlds(cfg: DeepSeekMoEConfig, world: int, gpus_per_node: int,
                  global_batch: int) -> list[int]:
    """The nearest GPU counts below and above ``world`` (in whole nodes when ``world`` is) that
    have candidates: TP (within a node) x a PP that splits the layers x a data-parallel size
    that divides the global batch."""
    step = gpus_per_node if world % gpus_per_node == 0 else 1
    worlds = {tp * pp * dp for tp in _divisors(gpus_per_node)
              for pp in range(1, cfg.num_layers + 1) if pipeline_splits(cfg.num_layers, pp)
              for dp in _divisors(global_batch)}
    worlds = {n for n in worlds if n % step == 0 and (n <= gpus_per_node or n % gpus_per_node == 0)}
    below = max((n for n in worlds if n < world), default=None)
    above = min((n for n in worlds if world < n <= 2 * world), default=None)
    return [n for n in (below, above) if n is not None]


@dataclass
class Ranked:
    layout: Layout
    estimate: Estimate
    run: RunConfig



def search(run: RunConfig, cluster: Cluster, top: int = 10, min_headroom: float = 0.0,
           options: MemoryOptions = MemoryOptions(), rates: Rates = Rates()) -> dict:
    """The ``top`` fastest layouts of ``run``'s model on ``cluster`` that fit, leaving
    ``min_headroom`` of the GPU's memory free, and that the config validation accepts."""
    cfg, train, world = run.model, run.train, cluster.num_gpus
    params = count_params(cfg, train.vocab_size)
    global_batch = train.global_batch_size
    if global_batch is None:  # micro_batch_size x DP: varies with the layout; keep the tokens
        global_batch = train.micro_batch_size * world
    groups = candidates(cfg, world, cluster.gpus_per_node, global_batch)
    per_token = flops_per_token(cfg, params.padded_vocab_size, train.seq_length)
    fitting, short = [], []  # short: those that fit without the headroom asked for
    for group in groups:
        for i, layout in enumerate(group):
            est = _estimate(cfg, params, cluster, train.seq_length, layout, global_batch,
                            options, rates, per_token)
            if est is not None and est.headroom >= min_headroom:
                fitting.append((est.time["step_time"], est.peak, layout, est))
                continue
            if est is not None and est.headroom >= 0:
                short.append((est.headroom, layout))
            if i == 0:
                break  # not even its least memory-hungry member fits
    fitting.sort(key=lambda item: item[:2])
    ranked, rejected = [], 0
    for _, _, layout, est in fitting:
        candidate_run = _validated(run, layout, world, global_batch)
        if candidate_run is None:
            rejected += 1
            continue
        ranked.append(Ranked(layout, est, candidate_run))
        if len(ranked) == top:
            break
    # None ranked: the roomiest layout that fits without the headroom and that the validation
    # accepts (a smaller --min-headroom finds it)
    most_free = None if ranked else next(
        (free for free, layout in sorted(short, key=lambda s: -s[0])
         if _validated(run, layout, world, global_batch) is not None), None)
    return {"gpu": cluster.gpu.name, "num_gpus": world, "gpus_per_node": cluster.gpus_per_node,
            "global_batch_size": global_batch, "candidates": sum(map(len, groups)),
            "fit": len(fitting), "most_free": most_free,
            "rejected_by_validation": rejected, "ranked": ranked,
            "nearby_gpus": [] if groups else nearby_worlds(cfg, world, cluster.gpus_per_node,
                                                           global_batch)}


def _estimate(cfg, params: ParamCount, cluster, seq, layout: Layout, global_batch, options,
              rates, per_token: int) -> Estimate | None:
    candidate = copy.copy(cfg)
    for name, value in layout.model_fields().items():
        setattr(candidate, name, value)
    try:
        est = estimate(candidate, params, cluster, seq, layout.micro_batch_size, global_batch,
                       options, rates, time_if_unfit=False, model_flops_per_token=per_token)
    except (ValueError, AssertionError, ZeroDivisionError):
        return None  # a split Megatron cannot make: the validation would refuse it too
    return est if est.time is not None else None


def _validated(run: RunConfig, layout: Layout, world: int, global_batch: int
               ) -> RunConfig | None:
    overrides = layout.overrides(run) + [f"global_batch_size={global_batch}"]
    try:
        candidate = run_config_from_dict(run.source, overrides, instantiate_checks=False)
        check_world_size(candidate, world)
    except (YamlConfigError, ValueError):
        return None
    return candidate
