"""Transformer Engine detection: not installed (quiet), installed but broken (reported once, with the
import error), or turned off on purpose (DSMOE_DISABLE_TE=1). A stand-in `transformer_engine` package
plays the installed TE; torch.cuda.is_available is patched to True, as on a GPU node."""

import sys

import pytest
import torch

from dsmoe_megatron.backends import resolve_expert_backend, te_available


@pytest.fixture
def gpu_node(monkeypatch, tmp_path):
    """A GPU machine whose site-packages is tmp_path; returns a function that installs a stand-in TE."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
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
