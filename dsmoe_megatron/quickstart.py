"""``bash bootstrap.sh train [key=value ...]``: train yaml_configs/tiny.yaml on whatever this machine has.

What the hardware needs is decided here, in one place:

- no GPU: the YAML as it is, in this process (the trainer trains in fp32 on CPU);
- GPUs: ``torchrun`` on all of them, bf16 (fp32 on a GPU without bf16 tensor cores, where the
  expert backend ``auto`` then picks the per-expert loop unless Transformer Engine imports), and
  the smallest global batch of at least the YAML's that every data-parallel rank's micro-batches
  divide.

Overrides given on the command line come last, so they win.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from dsmoe_megatron.cli import quiet_when_run_as_main

quiet_when_run_as_main(__name__)

TINY = str(Path(__file__).resolve().parents[1] / "yaml_configs" / "tiny.yaml")


@dataclass(frozen=True)
class Hardware:
    gpus: int
    bf16: bool


def detect() -> Hardware:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # Not emulated bf16 (torch's default counts a V100 or T4 in): those train in fp32.
    return Hardware(gpus, gpus > 0 and torch.cuda.is_bf16_supported(including_emulation=False))


def hardware_overrides(hw: Hardware, config: str = TINY, user: list[str] = ()) -> list[str]:
    """key=value overrides that make ``config`` (with the user's overrides) run on ``hw``."""
    if hw.gpus == 0:
        return []
    from dsmoe_megatron.yaml_config import check_world_size, load_run_config

    run = load_run_config(config, list(user), instantiate_checks=False)
    precision = [f"model_parallel.bf16={'true' if hw.bf16 else 'false'}"]
    per_step = run.train.micro_batch_size * run.layout.data_parallel_size(hw.gpus)
    wanted = run.train.global_batch_size or per_step
    batch = [f"global_batch_size={per_step * math.ceil(wanted / per_step)}"]
    overrides = [*precision, *batch]
    check_world_size(load_run_config(config, [*overrides, *user], instantiate_checks=False), hw.gpus)
    return overrides


def main(argv: list[str] | None = None) -> int:
    from dsmoe_megatron.cli import quiet_warnings

    user = quiet_warnings(argv)  # before the imports that warn (Megatron-core's, via config)
    from dsmoe_megatron.config import ConfigError

    hw = detect()
    try:
        overrides = hardware_overrides(hw, TINY, user)
    except ConfigError as err:
        print(f"quick start: {err}", file=sys.stderr)
        return 2
    if hw.gpus == 0:
        print("quick start: no GPU, training on the CPU in fp32", flush=True)
        from dsmoe_megatron.train import main as train

        return train([TINY, *user])
    print(f"quick start: {hw.gpus} GPU(s): {' '.join(overrides)}", flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={hw.gpus}", "-m", "dsmoe_megatron.train", TINY,
                              *overrides, *user])


if __name__ == "__main__":
    sys.exit(main())
