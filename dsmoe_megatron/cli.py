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
import errno
import importlib
import logging
import os
import select
import shutil
import signal
import sys
import warnings
from pathlib import Path

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
    "`torch.distributed.reduce_scatter_tensor` is deprecated",  # the same
    "The argument order of load has been changed",  # torch.distributed.checkpoint, from Megatron
    # Loading a checkpoint in one process (the converter, a single-rank resume).
    "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load",
    # Megatron's distributed optimizer zeroes the .grad of its parameter-shard views.
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    # Megatron's logging helpers in a single-process tool (dsmoe-preprocess): rank 0 is right.
    "Could not determine rank from torch.distributed",
    "Could not determine world size from torch.distributed",
    # About Megatron's router (moe_router_dtype); ours always routes in fp32 (router.py).
    r"Using a large number of experts \(e.g. >=32\) without fp32 routing",
    # About Megatron's token dispatchers; our block splits the tokens over the TP ranks itself
    # when sequence parallelism is off (moe.py, MoELayer._into_experts).
    "When using expert parallelism and tensor parallelism for training, sequence parallelism "
    "must be used",
    # Megatron's tensor-parallel layers, for GPU speed; on GPUs runtime.initialize sets
    # CUDA_DEVICE_MAX_CONNECTIONS=1 (and says when it is too late), on a CPU it means nothing.
    "When using (async grad allreduce|sequence parallelism) it is recommended to set the "
    "environment variable CUDA_DEVICE_MAX_CONNECTIONS",
    # transformers reading the config.json beside a tokenizer (dsmoe-preprocess --tokenizer
    # SAVE/hf_source), which the tokenizer does not use.
    "`rope_scaling` is deprecated",
)
# Logged messages (prefixes), by logger.
HARMLESS_LOG_RECORDS = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
    "megatron.core.distributed.distributed_data_parallel": (
        "DistributedDataParallel: full_param_layout not provided",),  # it computes the layout
    # The same config.json, of a model type whose code is not there, read as a generic config.
    "transformers.configuration_utils": ("You are using a model of type",),
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


# How each tool module's one-line messages start: its console script (pyproject.toml's
# [project.scripts]) or, for those run only as `python -m`, the name its own messages use.
TOOLS = {"train": "dsmoe-train", "convert": "dsmoe-convert", "plan": "dsmoe-plan",
         "data": "dsmoe-preprocess", "analyze": "dsmoe-analyze",
         "synthetic": "dsmoe_megatron.synthetic", "quickstart": "quick start",
         "megatron_lm": "dsmoe_megatron.megatron_lm"}


def quiet_when_run_as_main(module_name: str) -> None:
    """``python -m dsmoe_megatron.X`` / ``torchrun -m ...`` runs X as a console script does
    (``_run``: the harmless warnings filtered before X's imports raise them, and Ctrl-C while
    they import or a reader of stdout that left early one line, not a traceback); this module
    then stops here. The processes those spawn, which import it again as ``__mp_main__``, only
    filter the warnings. Call it with ``__name__`` above the module's other imports."""
    spec = sys.modules["__main__"].__spec__ if module_name == "__main__" else None
    module = spec.name.removeprefix("dsmoe_megatron.") if spec is not None else None
    if module in TOOLS:
        sys.exit(_run(TOOLS[module], module))
    if module_name in ("__main__", "__mp_main__"):
        quiet_warnings()


def default_file_mode(file: str | Path | int) -> None:
    """Give ``file`` (a path or an open descriptor) the mode open() creates files with, 0o666
    less the umask: tempfile.mkstemp and safetensors create them 0o600, which colleagues on a
    shared cluster cannot read."""
    umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)


def positive_int(text: str) -> int:
    """argparse type for counts and iteration numbers: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1, 2, ...), got {text!r}")
    return value


def print_error(tool: str, message: object) -> None:
    """``tool: message`` on stderr in one write: under torchrun every rank says it, and print()'s
    separate newline let two ranks' messages run together on one line. Each rank prints its
    own: one that stayed silent could exit first and torchrun then stop the others unheard."""
    sys.stderr.write(f"{tool}: {message}\n")
    sys.stderr.flush()


def describe_os_error(what: str, error: BaseException, path: str | Path | None = None,
                      writer: bool = False) -> str:
    """One line for a failed file operation: what failed, why, the file, and the free space of
    the filesystem it was writing to (the error's file, else ``path``). ``writer``: the error is
    Megatron's checkpoint writer's, which reports a full disk as a worker failure that names no
    OSError (torch's stream writer fails with "unexpected pos"): without a named cause, under 1
    MiB free is then said to be one (elsewhere such an error is not the disk's, e.g. a damaged
    checkpoint that dsmoe-convert read)."""
    causes = list(_causes(error))
    cause = next((e for e in causes if isinstance(e, OSError)), causes[-1])
    why = ((cause.strerror if isinstance(cause, OSError) else None)
           or next(iter(str(cause).splitlines()), type(cause).__name__))  # EOFError() says nothing
    filename, code = getattr(cause, "filename", None), getattr(cause, "errno", None)
    # EEXIST: os.makedirs met a file where a directory of the path should be.
    if code == errno.ENOTDIR or (code == errno.EEXIST and not os.path.isdir(filename or "")):
        why += " (a part of the path is a file)"
    text = f"{what}: {why}" + (f" ({filename})" if filename else "")
    # A named cause other than a full disk or quota (read-only, a file in the path, ...) is the
    # whole story; otherwise the free space may be.
    if code not in (None, errno.ENOSPC, errno.EDQUOT):
        return text
    space = _free_space(filename or path)
    if space is None:
        return text
    free, where = space
    if writer and code is None and free < 2**20:  # a worker failure of a full disk: say it
        text = f"{what}: No space left on device (the error said: {why})"
    return text + f"; {free / 2**20:,.0f} MiB free on the filesystem of {where}"


# What a rank says when Gloo reports that a peer process of the job went away.
PEER_EXITED = "another process of the job exited (its message is above)"


def peer_exited(error: BaseException) -> bool:
    """``error`` is Gloo's word that another rank's process exited (its own error, a kill):
    'Connection closed by peer' or, where it was reading, 'Connection reset by peer'. A file's
    (a network share's) OSError says the latter too: not in itself, nor where the checkpoint
    writer repeats it in its own error ('Worker failure: [Errno 104] ...', torch's per-rank
    failures), which names its errno as Gloo does not."""
    file_reset = f"[Errno {errno.ECONNRESET}] {os.strerror(errno.ECONNRESET)}"
    return any(f"Connection {how} by peer" in str(e).replace(file_reset, "")
               for e in _causes(error) if not isinstance(e, OSError)
               for how in ("closed", "reset"))


def first_sentence(error: BaseException, limit: int = 300) -> str:
    """The gist of ``error``'s message: its first line, cut at its first sentence when long
    (torch's unpickling errors run on for paragraphs, advice to load untrusted files included)."""
    text = next(iter(str(error).strip().splitlines()), "")
    if len(text) > 120 and ". " in text:
        text = text[:text.index(". ")]
    return text[:limit]


def find_cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first of ``error`` and what is behind it (see ``_causes``) that is a ``kind``."""
    return next((e for e in _causes(error) if isinstance(e, kind)), None)


def root_cause(error: BaseException) -> BaseException:
    """The innermost of ``error`` and what is behind it (see ``_causes``)."""
    *_, innermost = _causes(error)
    return innermost


def _causes(error: BaseException):
    """``error`` and what is behind it: its causes, or a distributed checkpoint's per-rank
    failures ((exception, traceback) pairs), outermost first."""
    for _ in range(16):
        yield error
        failures = getattr(error, "failures", None)  # torch.distributed.checkpoint
        if isinstance(failures, dict) and failures:
            inner = next(iter(failures.values()))
            error = inner[0] if isinstance(inner, tuple) else inner
        elif error.__cause__ is not None or error.__context__ is not None:
            error = error.__cause__ or error.__context__
        else:
            return


def _free_space(path) -> tuple[int, Path] | None:
    """(bytes free to this user, the existing directory of ``path`` they were measured at)."""
    if path is None:
        return None
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free, where
    except OSError:
        return None


def _stdout_reader_gone() -> bool:
    """stdout is a pipe or socket whose reader has closed it."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):  # no file descriptor (captured), or closed
        return False


def _run(tool: str, module: str) -> int:
    sys.argv[1:] = quiet_warnings()

    def stop_now(*_):
        os.write(2, f"{tool}: interrupted\n".encode())
        os._exit(130)

    # Ctrl-C while the libraries import (seconds; nothing is written yet) stops at once: raised
    # inside them, KeyboardInterrupt can be caught and dropped (training went on) or leave a
    # half-imported module behind (numpy's RecursionError traceback).
    default = signal.signal(signal.SIGINT, stop_now)
    try:
        # torch too, which some tools import only in main(): a KeyboardInterrupt raised inside
        # its C++ initialisation aborts the process (SIGABRT, "terminate called ...").
        importlib.import_module("torch")
        tool_module = importlib.import_module(f"dsmoe_megatron.{module}")
    finally:
        signal.signal(signal.SIGINT, default)
    try:
        return tool_module.main()
    except KeyboardInterrupt:  # one a tool passed on after cleaning up
        print(f"{tool}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket (a process that died): not a reason to stop quietly
        # The reader of stdout left (`dsmoe-plan ... | head`): stop as SIGPIPE would stop a C
        # tool. stdout goes to /dev/null, or the interpreter's last flush raises again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


def train() -> int:
    return _run("dsmoe-train", "train")


def convert() -> int:
    return _run("dsmoe-convert", "convert")


def plan() -> int:
    return _run("dsmoe-plan", "plan")


def preprocess() -> int:
    return _run("dsmoe-preprocess", "data")


def analyze() -> int:
    return _run("dsmoe-analyze", "analyze")
