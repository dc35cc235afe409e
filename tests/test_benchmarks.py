"""The benchmark scripts' GPU-machine steps, run on the CPU: what they import and build."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

# gpu_check.py as gpu_check.sh runs it, on a machine where pytest does not import.
WITHOUT_PYTEST = """
import runpy, sys
sys.modules["pytest"] = None
sys.argv = ["gpu_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def test_gpu_check_reference_runs_without_pytest():
    # gpu_check.sh asks only for torch, megatron-core, transformers, safetensors and pyyaml.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_PYTEST, "reference"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "match the per-token reference" in proc.stdout


def test_bench_memory_checks_its_baseline_before_measuring(tmp_path, monkeypatch):
    """A --baseline that cannot give the 'before' column is refused at the start, not after the
    minutes of measurement; the one benchmarks/README.md names serves, from the repository root."""
    import bench_memory

    monkeypatch.setattr(bench_memory, "run_ep", lambda *a: pytest.fail("measured first"))
    documented = re.findall(r"python benchmarks/bench_memory\.py --baseline (\S+)",
                            (ROOT / "benchmarks" / "README.md").read_text())
    assert documented
    recorded = json.loads((ROOT / documented[0]).read_text())
    one_ep = tmp_path / "one_ep.json"
    one_ep.write_text(json.dumps({**recorded, "results": {"1": recorded["results"]["1"]}}))
    other_shape = tmp_path / "other_shape.json"
    other_shape.write_text(json.dumps(
        {**recorded, "meta": {**recorded["meta"], "shapes": {"16B": [1, 2, 3, 4, 5]}}}))
    for path, message in [(tmp_path / "missing.json", "missing.json: cannot be read as JSON"),
                          (one_ep, "no memory results for shape 16B at EP=2"),
                          (other_shape, r"measured shape 16B as \[1, 2, 3, 4, 5\]")]:
        with pytest.raises(SystemExit, match=message):
            bench_memory.main(["--baseline", str(path), "--out", str(tmp_path)])
    with monkeypatch.context() as m:
        m.chdir(ROOT)
        for path in documented:
            assert bench_memory.load_baseline(path, list(bench_memory.SHAPES), [1, 2])
    assert bench_memory.load_baseline(one_ep, ["small"], [1])


@pytest.fixture
def single_rank_runtime():
    from dsmoe_megatron import runtime

    runtime.initialize()
    yield
    runtime.shutdown()


def test_bench_block_builds_without_gradient_accumulation_fusion(single_rank_runtime,
                                                                 monkeypatch):
    """bench_block runs its blocks without Megatron's DDP, whose main_grad buffers the fused
    weight-gradient accumulation writes into: it stays off on a machine that has the fusion."""
    import bench_block

    from dsmoe_megatron import config

    fusions = config.machine_fusions()
    monkeypatch.setattr(config, "machine_fusions",
                        lambda: {**fusions, "gradient_accumulation_fusion": True})
    block = bench_block.make_block(*bench_block.SHAPES_CPU["small"], "grouped_mm",
                                   torch.float32, torch.device("cpu"))
    assert not block.config.gradient_accumulation_fusion


class FakeGroupedLinear(torch.nn.Module):
    """Transformer Engine's GroupedLinear as its state dict shows it: weight0... and
    _extra_state."""

    def __init__(self, num_gemms, out_features, in_features):
        super().__init__()
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", torch.nn.Parameter(
                torch.zeros(out_features, in_features)))

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        pass


class FakeTEExperts(torch.nn.Module):
    def __init__(self, num_experts, hidden, width):
        super().__init__()
        self.gate_up_proj = FakeGroupedLinear(num_experts, 2 * width, hidden)
        self.down_proj = FakeGroupedLinear(num_experts, hidden, width)


def test_bench_block_copies_weights_into_te_experts(single_rank_runtime):
    import bench_block

    shape = bench_block.SHAPES_CPU["small"]
    hidden, _, routed, width, _ = shape
    source, block = (bench_block.make_block(*shape, "grouped_mm", torch.float32,
                                            torch.device("cpu")) for _ in range(2))
    block.experts = FakeTEExperts(routed, hidden, width)
    bench_block.copy_weights(source, block)
    for name in ("gate_up_proj", "down_proj"):
        for i, weight in enumerate(getattr(source.experts, name)):
            torch.testing.assert_close(getattr(getattr(block.experts, name), f"weight{i}"), weight)
    torch.testing.assert_close(block.router.weight, source.router.weight)
    torch.testing.assert_close(block.shared_experts.linear_fc1.weight,
                               source.shared_experts.linear_fc1.weight)


@pytest.mark.parametrize("script, work", [("plan_vs_published", "estimate"),
                                          ("layout_independent_init", "measure")])
def test_help_prints_usage_and_measures_nothing(script, work, monkeypatch, capsys):
    """--help (or a stray argument) must not run the benchmark, which replaces the recorded
    results in benchmarks/results."""
    module = __import__(script)
    monkeypatch.setattr(module, work, lambda *a: pytest.fail("the benchmark ran"))
    for argv, code in ((["--help"], 0), (["--out", "x"], 2)):
        with pytest.raises(SystemExit) as stop:
            module.main(argv)
        assert stop.value.code == code
    assert "usage:" in capsys.readouterr().out
