"""Transformer Engine detection: not installed (quiet), installed but broken (reported once, with the
import error), or turned off on purpose (DSMOE_DISABLE_TE=1). A stand-in `transformer_engine` package
plays the installed TE; torch.cuda.is_available is patched to True, as on a GPU node (an sm90 one)."""

import sys

import pytest
import torch

from dsmoe_megatron.backends import resolve_expert_backend, te_available


@pytest.fixture
def gpu_node(monkeypatch, tmp_path):
    """A GPU machine whose site-packages is tmp_path; returns a function that installs a stand-in TE."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DSMOE_DISABLE_TE", raising=False)
    te_available.cache_clear()

    def install_te(pytorch_module_source: str):
        package = tmp_path / "transformer_engine"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "pytorch.py").write_text(pytorch_module_source)

    yield install_te
    te_available.cache_clear()
    for name in [n for n in sys.modules if n.split(".")[0] == "transformer_engine"]:
        del sys.modules[name]


def test_broken_te_is_reported_once_and_the_local_path_used(gpu_node, capsys):
    gpu_node("raise OSError('libcudnn.so.9: cannot open shared object file')")
    assert te_available() is False and te_available() is False
    err = capsys.readouterr().err
    assert err.count("transformer_engine is installed but `import transformer_engine.pytorch` fails") == 1
    assert "OSError: libcudnn.so.9" in err and "DSMOE_DISABLE_TE=1" in err
    assert resolve_expert_backend("auto") in ("grouped_mm", "sequential")


def test_te_not_installed_is_quiet(gpu_node, capsys):
    assert te_available() is False
    assert capsys.readouterr().err == ""


def test_working_te_is_used_unless_disabled(gpu_node, monkeypatch, capsys):
    gpu_node("")
    assert te_available() is True and resolve_expert_backend("auto") == "te"
    te_available.cache_clear()
    monkeypatch.setenv("DSMOE_DISABLE_TE", "1")
    assert te_available() is False and resolve_expert_backend("auto") != "te"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("capability, dtype, backend", [
    ((9, 0), torch.bfloat16, "grouped_mm"), ((10, 0), torch.bfloat16, "grouped_mm"),
    ((8, 0), torch.bfloat16, "sequential"), ((12, 0), torch.bfloat16, "sequential"),
    ((11, 0), torch.bfloat16, "sequential"), ((9, 0), torch.float32, "sequential"),
    ((9, 0), torch.float16, "sequential")])
def test_auto_takes_grouped_mm_where_torch_has_a_grouped_kernel(gpu_node, monkeypatch,
                                                                  capability, dtype, backend):
    """torch._grouped_mm on CUDA is a grouped kernel for bf16 on sm90 and sm100 (compute capability
    major 9 or 10: not sm120, the RTX / workstation Blackwell); elsewhere a loop
    of GEMMs that copies the offsets to the host on every call, so the per-expert loop (one host
    copy per layer) is the better choice there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_expert_backend("auto", dtype) == backend
    assert resolve_expert_backend("grouped_mm", dtype) == "grouped_mm"  # asked for: kept


def test_auto_takes_grouped_mm_on_the_cpu_in_any_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_expert_backend("auto", dtype) == "grouped_mm"


@pytest.mark.parametrize("capability, dtype, runs", [
    ((9, 0), torch.bfloat16, True), ((10, 0), torch.bfloat16, False),
    ((12, 0), torch.bfloat16, False), ((8, 0), torch.bfloat16, False),
    ((9, 0), torch.float32, False)])
def test_torch_2_8_runs_grouped_mm_for_bf16_on_sm90_only(gpu_node, monkeypatch, capability,
                                                         dtype, runs):
    """torch 2.8's CUDA _grouped_mm is its sm90 bf16 kernel alone ("only supported on CUDA devices
    with compute capability = 9.0", "Expected mat_a to be BFloat16"), without 2.9's GEMM loop
    for the rest: elsewhere auto takes the per-expert loop, and grouped_mm asked for is refused
    when the config is built, not at the first forward."""
    from torch.torch_version import TorchVersion

    from common import tiny_config
    from dsmoe_megatron.backends import grouped_mm_runs
    from dsmoe_megatron.config import ConfigError

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.8.0+cu128"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    grouped_mm_runs.cache_clear()
    try:
        assert grouped_mm_runs(dtype) is runs
        assert resolve_expert_backend("auto", dtype) == ("grouped_mm" if runs else "sequential")
        if runs:
            return
        with pytest.raises(ConfigError, match=r"moe_expert_backend='grouped_mm' needs "
                                              r"torch._grouped_mm for this device"):
            tiny_config(moe_expert_backend="grouped_mm", params_dtype=dtype,
                        bf16=dtype == torch.bfloat16)
    finally:
        grouped_mm_runs.cache_clear()
