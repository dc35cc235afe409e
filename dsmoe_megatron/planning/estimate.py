"""Memory and step time of one layout on one cluster: what dsmoe-plan reports and --search ranks."""

from __future__ import annotations

from dataclasses import dataclass

from dsmoe_megatron.config import DeepSeekMoEConfig
from dsmoe_megatron.planning.hardware import Cluster
from dsmoe_megatron.planning.memory import MemoryOptions, estimate_memory
from dsmoe_megatron.planning.params import ParamCount, flops_per_token
from dsmoe_megatron.planning.step_time import Rates, estimate_step_time


@dataclass
class Estimate:
    memory: dict
    gpu_memory: float
    time: dict | None = None

    @property
    def peak(self) -> float:
        return self.memory["max_bytes_per_gpu"]

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory

    @property
    def headroom(self) -> float:
        """Share of the GPU's memory left at the peak, after the allowance."""
        return 1 - self.peak / self.gpu_memory


def estimate(cfg: DeepSeekMoEConfig, params: ParamCount, cluster: Cluster, seq: int,
             micro_batch_size: int, global_batch: int, options: MemoryOptions = MemoryOptions(),
             rates: Rates = Rates(), time_if_unfit: bool = True,
             model_flops_per_token: int | None = None) -> Estimate:
    """``cfg`` carries the layout; ``global_batch`` sequences per optimizer step. Without
    ``time_if_unfit`` a layout that does not fit gets no step time (``time`` is None).
    ``model_flops_per_token`` (layout-independent) saves recounting it per layout."""
    world = cluster.num_gpus
    dp = world // (cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size)
    microbatches = global_batch // (micro_batch_size * dp)
    memory = estimate_memory(cfg, params, world, microbatches, seq, micro_batch_size, options)
    out = Estimate(memory, cluster.gpu.memory)
    if out.fits or time_if_unfit:
        per_token = model_flops_per_token or flops_per_token(cfg, params.padded_vocab_size, seq)
        flops = per_token * global_batch * seq
        out.time = estimate_step_time(cfg, params, cluster, seq, micro_batch_size,
                                      microbatches, memory, flops, rates, options.impl)
    return out
