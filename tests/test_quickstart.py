"""`bash bootstrap.sh train` picks a precision and a global batch that work on the machine it finds."""

import pytest

from dsmoe_megatron.config import ConfigError
from dsmoe_megatron.quickstart import TINY, Hardware, hardware_overrides
from dsmoe_megatron.yaml_config import check_world_size, load_run_config

# tiny.yaml: micro_batch_size 4, global_batch_size 8. By hand: the smallest multiple of 4 x GPUs >= 8.
GLOBAL_BATCH = {1: 8, 2: 8, 3: 12, 4: 16, 5: 20, 6: 24, 8: 32}


def test_tiny_yaml_as_is_does_not_fit_three_gpus():
    with pytest.raises(ConfigError, match="global_batch_size=8 is not divisible"):
        check_world_size(load_run_config(TINY, instantiate_checks=False), 3)


@pytest.mark.parametrize("gpus", sorted(GLOBAL_BATCH))
def test_gpus_train_in_bf16_with_a_batch_every_rank_divides(gpus):
    overrides = hardware_overrides(Hardware(gpus, bf16=True))
    run = load_run_config(TINY, overrides, instantiate_checks=False)
    assert run.model.bf16 and run.model.moe_expert_backend == "auto"
    assert run.train.global_batch_size == GLOBAL_BATCH[gpus]
    assert check_world_size(run, gpus) == gpus


def test_gpu_without_bf16_trains_fp32():
    run = load_run_config(TINY, hardware_overrides(Hardware(2, bf16=False)), instantiate_checks=False)
    assert not run.model.bf16 and run.model.moe_expert_backend == "auto"


@pytest.mark.parametrize("major, bf16", [(7, False), (8, True), (9, True)])
def test_bf16_means_bf16_tensor_cores_not_emulation(monkeypatch, major, bf16):
    """torch.cuda.is_bf16_supported() says True on a V100 or T4 (compute capability 7.x) by
    default, where bf16 is only emulated: those GPUs train in fp32."""
    from types import SimpleNamespace

    import torch

    from dsmoe_megatron.quickstart import detect

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True, raising=False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert detect() == Hardware(2, bf16)


def test_cpu_keeps_the_yaml_and_user_overrides_win():
    assert hardware_overrides(Hardware(0, bf16=False)) == []
    # micro_batch_size=2 on 3 GPUs: multiples of 6, at least 8.
    user = ["micro_batch_size=2"]
    run = load_run_config(TINY, [*hardware_overrides(Hardware(3, True), TINY, user), *user],
                          instantiate_checks=False)
    assert (run.train.micro_batch_size, run.train.global_batch_size) == (2, 12)
    # A global batch the user sets explicitly is kept, and refused clearly when the GPUs do not divide it.
    with pytest.raises(ConfigError, match="global_batch_size=8 is not divisible"):
        hardware_overrides(Hardware(3, True), TINY, ["global_batch_size=8"])


def test_readme_python_snippet_runs_as_written():
    """The README's "block in your own Megatron-core code" snippet, copied into a fresh `python`."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme[readme.index("### The block in your own Megatron-core code"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = re.search(r"print\(logits\.shape\)\s+# (torch\.Size\(\[[^\]]*\]\))", snippet).group(1)
    assert printed in proc.stdout


def test_readme_file_table_names_every_module_that_exists():
    """"What is in the box": every module and folder of dsmoe_megatron/ is in the table, and every
    path the table names exists (a bare name is a sibling of the row's first path)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    table = readme[readme.index("## What is in the box"):readme.index("### The block in your own")]
    named = set()
    for row in re.findall(r"^\| (`.*?`) \|", table, re.M):
        paths = re.findall(r"`([^`]+)`", row)
        named |= {(root / paths[0]).parent / p if "/" not in p.rstrip("/") else root / p
                  for p in paths}
    package = root / "dsmoe_megatron"
    modules = {p for p in package.iterdir() if p.suffix == ".py" or p.is_dir()} - {
        package / "__init__.py", package / "__pycache__"}
    assert sorted(p.name for p in modules - named) == []
    assert sorted(str(p) for p in named if not p.exists()) == []
