"""Start-up shared by the command-line tools: hide the known-harmless warnings of a CPU install.

Megatron-core, Megatron-LM and torch warn on every run without apex, Transformer Engine or CUDA, and
about their own deprecations; those pages would bury our messages. Each tool's ``main()`` calls
``quiet_warnings(argv)`` first. ``-v`` / ``--verbose`` anywhere on the command line, or
``DSMOE_SHOW_WARNINGS=1``, shows everything. Importing the library filters nothing.

Some of these warnings are raised while the tool's module is imported, before ``main()`` runs, so the
console scripts (``dsmoe-train``, ...) are the functions at the bottom, which quiet the warnings first.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

SHOW_WARNINGS_ENV = "DSMOE_SHOW_WARNINGS"
VERBOSE_FLAGS = ("-v", "--verbose")

# warnings.warn messages (regular expressions matched at the start).
HARMLESS_WARNINGS = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "Only transformer-engine>=1.7.0 supports MoE experts",  # said when TE is not installed at all
    "MimoModelConfig is experimental",
    "full scope is deprecated",  # Megatron-core's own default for cuda_graph_modules
    "'pin_memory' argument is set as true but no accelerator is found",
    "`torch.distributed.all_gather_into_tensor` is deprecated",  # called inside Megatron-core
)
# Logged messages (prefixes), by logger.
HARMLESS_LOG_RECORDS = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def show_warnings(argv: list[str]) -> bool:
    return any(a in VERBOSE_FLAGS for a in argv) or os.environ.get(SHOW_WARNINGS_ENV, "") not in ("", "0")


def quiet_warnings(argv: list[str] | None = None) -> list[str]:
    """Filter the harmless warnings unless asked to show them; returns ``argv`` (default
    ``sys.argv[1:]``) without ``-v`` / ``--verbose``. Spawned processes inherit the choice."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if show_warnings(argv):
        os.environ[SHOW_WARNINGS_ENV] = "1"
    else:
        for message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for name, prefixes in HARMLESS_LOG_RECORDS.items():
            logger = logging.getLogger(name)
            if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
                logger.addFilter(_DropPrefixes(prefixes))
    return [a for a in argv if a not in VERBOSE_FLAGS]


def positive_int(text: str) -> int:
    """argparse type for counts and iteration numbers: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1, 2, ...), got {text!r}")
    return value


def _run(module: str) -> int:
    sys.argv[1:] = quiet_warnings()
    return importlib.import_module(f"dsmoe_megatron.{module}").main()


def train() -> int:
    return _run("train")


def convert() -> int:
    return _run("convert")


def plan() -> int:
    return _run("plan")


def preprocess() -> int:
    return _run("data")


def analyze() -> int:
    return _run("analyze")
