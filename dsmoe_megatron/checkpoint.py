"""Dist checkpoints: layout-independent, written atomically, checked before they are read.

    <save>/iter_0000100/        a Megatron dist checkpoint (torch_dist) + run.yaml
    <save>/latest               the newest complete iteration, replaced atomically

A checkpoint is written to ``iter_XXXXXXX.partial`` and renamed when every rank has finished;
``latest`` is updated only after that, so a crash mid-save leaves the last good one loadable.
The sharded keys are the model's own (``decoder.layers.N.mlp.experts.gate_proj`` [E, W, H], ...),
and the distributed optimizer's state is saved per parameter in the same keys
(``fully_reshardable``), so a checkpoint saved under one TP/PP/EP/DP layout loads under any
other, optimizer state included, and in another precision (optimizer_precision.py). Loading
takes the state (moments, step) from the checkpoint and the hyper-parameters (lr, betas, weight
decay, ...) from the optimizer it loads into.

Checkpoints are trusted input: Megatron's ``.metadata`` file is a Python pickle.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import queue
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from dsmoe_megatron import optimizer_precision as precision
from dsmoe_megatron.cli import (PEER_EXITED, describe_os_error, find_cause, first_sentence,
                                peer_exited, root_cause)

RUN_CONFIG_NAME = "run.yaml"
LATEST_NAME = "latest"
# Megatron-LM's own name for `latest` (its training loop: dsmoe_megatron.megatron_lm).
MEGATRON_LM_TRACKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's layout-independent format (its default is deprecated and broken).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# Parameter-group fields that describe which parameters a group holds, not how to train them.
_GROUP_STRUCTURE = ("is_expert_parallel", "wd_mult", "lr_mult", "is_decoupled_lr")
# load= works only for a new run: in the run's own save directory --resume reads `latest`.
_EARLIER_DIR = ("or name its iter_ directory: --checkpoint DIR to dsmoe-convert, or load=DIR with "
                "a new save directory to dsmoe-train")


def _recovery_hint(ckpt: Path) -> str:
    """How to resume from a checkpoint earlier than the damaged or missing ``ckpt``, naming
    those beside it (a requeued job that stops on it needs one) and the file that names the
    one to resume (``_marker``)."""
    earlier = [i for i in complete_iterations(ckpt.parent) if i != iteration_of(ckpt)]
    return (f"resume from an earlier checkpoint (complete ones beside it: "
            f"{describe_iterations(earlier)}): write its iteration number into "
            f"{_marker(ckpt.parent)}, " + _EARLIER_DIR)


class CheckpointError(RuntimeError):
    pass


def _read_tensor_metadata_without_strides() -> None:
    """torch 2.15 gives torch.distributed.checkpoint's TensorProperties a ``strides`` field;
    Megatron-core 0.19 reads a checkpoint's tensor metadata as ``torch.empty(size,
    **properties.__dict__)``, which takes no ``strides``, so every load failed. Megatron is given
    a copy of the metadata without the field (no-op on earlier torch)."""
    strategy = torch_strategy.TorchDistLoadShardedStrategy
    original = strategy.load_tensors_metadata
    if getattr(original, "dsmoe", False):
        return

    def without_strides(item):
        properties = getattr(item, "properties", None)  # tensors have them, bytes do not
        if properties is None or "strides" not in vars(properties):
            return item
        properties = copy.copy(properties)
        del vars(properties)["strides"]
        return dataclasses.replace(item, properties=properties)

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        if metadata is None:
            metadata = torch_strategy._get_filesystem_reader(checkpoint_dir).read_metadata()
        metadata = copy.copy(metadata)
        metadata.state_dict_metadata = {key: without_strides(item) for key, item in
                                        metadata.state_dict_metadata.items()}
        return original(self, checkpoint_dir, metadata)

    load_tensors_metadata.dsmoe = True
    strategy.load_tensors_metadata = load_tensors_metadata


_read_tensor_metadata_without_strides()


def collect_write_results_in_process() -> None:
    """Megatron's torch_dist writer hands its writing threads' results over the queue of a
    multiprocessing Manager, a process of its own started at the first save (made for saves in
    the background, which are not used here). A scheduler's or torchrun's SIGTERM reaches that
    process too and ends it, so the save after the signal (exit_signal_handler's) failed with
    'Broken pipe' and the steps since the last checkpoint were lost. The saves here run in the
    process that writes: a plain queue, and no extra process. Set when saving, not on import:
    Megatron-LM's loop (megatron_lm.py imports this module) may save in the background."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


# The OSErrors this process's checkpoint writers met in the current save. Megatron's writer
# reports a failed write as "Worker failure: ... <class 'RuntimeError'>", dropping the OSError
# that torch's stream writer had chained to its own error: a quota or a file size limit, which
# leave free space on the disk, was said to be an unknown failure.
_writer_os_errors: list[OSError] = []


def record_writer_os_errors() -> None:
    """Keep the OSError behind each failed write of Megatron's writer in _writer_os_errors."""
    write_item = filesystem_async._write_item
    if getattr(write_item, "records_os_errors", False):
        return

    @functools.wraps(write_item)  # the writer reads its signature
    def recording(*args, **kwargs):
        try:
            return write_item(*args, **kwargs)
        except Exception as error:
            cause = find_cause(error, OSError)
            if cause is not None:
                _writer_os_errors.append(cause)
            raise

    recording.records_os_errors = True
    filesystem_async._write_item = recording
    # The writer then logs the failure in two lines that name no cause; the save's error says it.
    logging.getLogger(filesystem_async.__name__).addFilter(
        lambda record: record.levelno < logging.ERROR or not _writer_os_errors)


def _writers_os_error() -> OSError | None:
    """The first OSError a writer of any rank met in this save (a collective)."""
    mine = _writer_os_errors[0] if _writer_os_errors else None
    if not dist.is_initialized():
        return mine
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return next((e for e in every if e is not None), None)


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        # No stray temporary file beside it, and the error names the file that could not be
        # replaced (an immutable or read-only `latest`), not the temporary one.
        tmp.unlink(missing_ok=True)
        raise type(error)(error.errno, error.strerror, str(path)) from error


def _model_keys(num_chunks: int) -> list[str]:
    """One entry per model chunk (virtual pipeline stages have several)."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(model_chunks) -> dict:
    keys = _model_keys(len(model_chunks))
    return {key: chunk.sharded_state_dict() for key, chunk in zip(keys, model_chunks)}


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


# ---- saving ---------------------------------------------------------------------------------

def save(save_dir: str | Path, iteration: int, model_chunks, optimizer=None,
         extra_state: dict | None = None, run_config_yaml: str | None = None,
         sharded_strategy=None) -> Path:
    """Save model (+ optimizer, + small extra state) for `iteration`; returns the final dir.
    ``sharded_strategy``: dist_checkpointing's (default: Megatron's torch_dist writer)."""
    final = iteration_dir(save_dir, iteration)
    partial = partial_dir(final)

    def start():
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()

    def finish():
        if run_config_yaml is not None:
            (partial / RUN_CONFIG_NAME).write_text(run_config_yaml)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        write_text_atomic(Path(save_dir) / LATEST_NAME, str(iteration))

    _on_rank0_for_all(start, save_dir, iteration, partial)
    collect_write_results_in_process()
    record_writer_os_errors()
    _writer_os_errors.clear()
    chunks = [_unwrap(c) for c in model_chunks]
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        # fp16 skips the steps whose gradients overflow: before its first real step torch Adam
        # has no state, which Megatron's distributed optimizer cannot save.
        create_adam_state(optimizer)
        with empty_adams_report_a_step(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    state["extra"] = extra_state or {}
    state["iteration"] = iteration
    state["has_optimizer"] = optimizer is not None
    try:
        dist_checkpointing.save(state, str(partial), sharded_strategy=sharded_strategy)
    except CheckpointException as error:  # a BaseException, raised on every rank with the
        # ranks' failures on rank 0 (the coordinator) only: every rank says rank 0's
        cause = _writers_os_error() or error
        _raise_on_every_rank(_save_failed(save_dir, iteration, cause, partial)
                             if _rank() == 0 else None, partial, error)
    except Exception as error:  # this rank's own
        message = _save_failed(save_dir, iteration, (
            _writer_os_errors[0] if _writer_os_errors else error), partial)
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(message) from error
    _on_rank0_for_all(finish, save_dir, iteration, partial)
    return final


def _on_rank0_for_all(step, save_dir, iteration: int, partial: Path) -> None:
    """Run ``step`` on rank 0; every rank raises if it failed (no rank waits on a dead one)."""
    failure = cause = None
    if _rank() == 0:
        try:
            step()
        except OSError as error:
            failure, cause = _save_failed(save_dir, iteration, error, partial), error
    _raise_on_every_rank(failure, partial, cause)


def _raise_on_every_rank(failure: str | None, partial: Path,
                         cause: BaseException | None) -> None:
    """Rank 0's ``failure`` (None: there was none) as a CheckpointError on every rank, after
    rank 0 removed the partial checkpoint; ``cause`` (this rank's error) stays its cause, for
    callers that word the failure themselves (dsmoe-convert)."""
    shared = [failure]
    if dist.is_initialized():
        dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(shared[0]) from cause


def _save_failed(save_dir, iteration: int, error: BaseException, partial: Path) -> str:
    """What failed, why, the free space against what the save had written (measured before
    the partial checkpoint is deleted), and the checkpoint a resume would start from."""
    try:
        latest = latest_iteration(save_dir)
    except (CheckpointError, OSError):
        latest = None
    final = iteration_dir(save_dir, iteration)
    if partial.is_dir():
        size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
        written = f" ({size / 2**20:,.1f} MiB of it had been written)"
    elif (final / "metadata.json").exists():  # renamed into place: `latest` could not name it
        written = f" (after {final.name} was complete)"
    else:
        written = ""
    kept = (f"the last complete checkpoint, {iteration_dir(save_dir, latest)}, is untouched and "
            "--resume continues from it once the cause is fixed" if latest is not None else
            "there is no complete checkpoint in it yet")
    what = f"saving iteration {iteration} to {save_dir} failed"
    # A rank killed mid-save (OOM, a scheduler) leaves its peers Gloo's word, not a cause.
    return ((f"{what}: {PEER_EXITED}" if peer_exited(error)
             else describe_os_error(what, error, save_dir, writer=True))
            + written + ". Nothing was lost: " + kept)


def partial_dir(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def delete_set_aside(save_dir: str | Path) -> list[Path]:
    """Delete the ``iter_*.deleting`` directories of ``save_dir`` (``set_aside_for_deletion``);
    returns those that are gone (one a file of which is held open may not be yet)."""
    removed = sorted(Path(save_dir).glob("iter_*.deleting"))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return [path for path in removed if not path.exists()]


def set_aside(path: Path, suffix: str) -> Path:
    """Rename ``path`` to ``path.name + suffix``, or ``.2`` + suffix and so on where that is
    taken (one rename, however large it is); returns the new name."""
    aside, n = path.with_name(path.name + suffix), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{n}{suffix}")
    os.replace(path, aside)
    return aside


def set_aside_for_deletion(path: Path) -> Path:
    """Rename ``path`` ``.deleting``: from then on no tool takes it for a checkpoint, a save of
    the same iteration does not meet it, and ``delete_set_aside`` deletes it. Returns the new
    name."""
    return set_aside(path, ".deleting")


def set_aside_unfinished_saves(save_dir: str | Path) -> list[Path]:
    """Set the ``.partial`` directories of interrupted saves aside for deletion (no live run
    writes them: the caller holds the save directory's run lock); returns their new names."""
    return [set_aside_for_deletion(path) for path in sorted(Path(save_dir).glob("iter_*.partial"))]


def prune_checkpoints(save_dir: str | Path, keep: int) -> list[Path]:
    """Set the complete checkpoints older than the ``keep`` newest up to ``latest`` aside for
    deletion (``keep_checkpoints``); returns their new names."""
    save_dir = Path(save_dir)
    latest = latest_iteration(save_dir)
    if latest is None:
        return []
    return [set_aside_for_deletion(iteration_dir(save_dir, i))
            for i in [i for i in complete_iterations(save_dir) if i <= latest][:-keep]]


# ---- finding and checking a checkpoint --------------------------------------------------------

# Fields of a checkpoint's model that must match the model it is loaded into: its shapes and
# the function its weights were trained for (the layout, precision and training settings may
# change on resume).
SAME_MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk",
    "moe_num_shared_experts", "moe_first_k_dense", "normalization", "gated_linear_unit",
    "add_bias_linear", "qk_layernorm", "layernorm_epsilon", "moe_router_pre_softmax",
    "rotary_base", "add_qkv_bias", "rotary_interleaved", "softmax_scale",
    "layernorm_zero_centered_gamma", "apply_residual_connection_post_layernorm", "qk_l2_norm",
    "no_rope_freq", "glu_linear_offset", "activation_func_clamp_value", "attention_output_gate",
    "multi_latent_attention", "window_size", "window_attn_skip_freq", "softmax_type",
    "experimental_attention_variant", "linear_attention_freq", "use_mup", "mup_attn_scale_power",
)


def saved_run_config(ckpt: Path):
    """The run config a checkpoint of dsmoe-train keeps (its run.yaml); None without one (a
    checkpoint of Megatron-LM's loop)."""
    from dsmoe_megatron import strict_yaml
    from dsmoe_megatron.yaml_config import YamlConfigError, run_config_from_dict

    path = Path(ckpt) / RUN_CONFIG_NAME
    if not path.exists():
        return None
    try:
        return run_config_from_dict(strict_yaml.load(path.read_text()), instantiate_checks=False,
                                    origin=str(path))
    except (YamlConfigError, strict_yaml.YamlSyntaxError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); restore it, or "
                              + _recovery_hint(path.parent)
                              ) from None


def model_difference(saved, config, vocab_size: int) -> tuple[str, object, object] | None:
    """The first field (SAME_MODEL_FIELDS, then vocab_size) in which the model of ``saved`` (a
    run config) differs from ``config`` with ``vocab_size``: (field, saved, current); None if
    it is the same model."""
    pairs = [(name, getattr(saved.model, name), getattr(config, name))
             for name in SAME_MODEL_FIELDS]
    if saved.model.moe_layer_pattern() != config.moe_layer_pattern():  # [0,1,1,1] may equal 1
        pairs.append(("moe_layer_freq", saved.model.moe_layer_freq, config.moe_layer_freq))
    pairs.append(("vocab_size", saved.train.vocab_size, vocab_size))
    return next(((name, then, now) for name, then, now in pairs if then != now), None)



def iteration_of(path: Path) -> int | None:
    """The iteration an ``iter_XXXXXXX`` directory is named for; None for other names
    (``.partial``, ``.discarded``)."""
    suffix = path.name[len("iter_"):]
    return int(suffix) if path.name.startswith("iter_") and suffix.isdigit() else None


def complete_iterations(save_dir: Path) -> list[int]:
    """The iterations of the finished (renamed, not .partial) checkpoints in ``save_dir``; one
    that cannot be read (another user's) is not counted, and does not stop the caller."""
    found = [(iteration_of(path), path) for path in save_dir.glob("iter_*")]
    return sorted(i for i, path in found
                  if i is not None and os.path.exists(path / "metadata.json"))


def latest_iteration(save_dir: str | Path) -> int | None:
    """The iteration named by ``save_dir/latest``; None if there is no such file."""
    return _iteration_named_by(Path(save_dir) / LATEST_NAME)


def _iteration_named_by(marker: Path) -> int | None:
    """The iteration in ``marker`` (``latest`` or Megatron-LM's tracker); None if it is absent."""
    if not marker.is_file():
        return None
    text = marker.read_text(errors="replace").strip()
    if not text.isdigit():
        complete = complete_iterations(marker.parent)
        raise CheckpointError(
            f"{marker} holds {text[:40]!r}, not an iteration number; it should name the newest "
            f"complete checkpoint (complete ones here: {describe_iterations(complete)}). Write "
            "one of those numbers into it, " + _EARLIER_DIR)
    return int(text)


def is_ours(path: str | Path) -> bool:
    """``path`` is a save directory of dsmoe-train / dsmoe-convert from-hf (its ``latest``, not
    Megatron-LM's tracker) or one of their iteration directories (with run.yaml)."""
    path = Path(path)
    if (path / MEGATRON_LM_TRACKER).exists():
        return False
    return (path / LATEST_NAME).is_file() or (path / RUN_CONFIG_NAME).is_file()


def describe_iterations(iterations: list[int]) -> str:
    if not iterations:
        return "none"
    shown = ", ".join(str(i) for i in iterations[-5:])
    return shown if len(iterations) <= 5 else f"..., {shown}"


def _marker(save_dir: Path) -> Path:
    """The file that names ``save_dir``'s iteration to resume: ``latest``, or in a save
    directory of Megatron-LM's loop without one, its tracker."""
    if not (save_dir / LATEST_NAME).is_file() and (save_dir / MEGATRON_LM_TRACKER).is_file():
        return save_dir / MEGATRON_LM_TRACKER
    return save_dir / LATEST_NAME


def resolve(path: str | Path) -> Path:
    """A save dir (-> its latest iteration; Megatron-LM's: its tracker's) or an iteration dir ->
    the iteration dir, checked to be complete and readable (CheckpointError names the file and
    what to do otherwise)."""
    path = Path(path)
    if (path / "metadata.json").exists() or path.name.startswith("iter_"):
        check_readable(path)
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist; check the path "
                              "(load: / --checkpoint)")
    marker = _marker(path)
    iteration = _iteration_named_by(marker)
    if iteration is None:
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            raise CheckpointError(
                f"{path} is a Hugging Face model directory (config.json + safetensors), not a "
                f"checkpoint of dsmoe-train; to train from it, import it: dsmoe-convert from-hf "
                f"--hf {path} --out DIR, then load: DIR (finetune: true starts at iteration 0)")
        complete = complete_iterations(path) if path.is_dir() else []
        hint = (f"; it holds checkpoints {describe_iterations(complete)} but no 'latest' file: "
                f"write the iteration to resume into {path / LATEST_NAME}" if complete else "")
        raise CheckpointError(
            f"no checkpoint at {path}: expected an iter_XXXXXXX directory or a save directory "
            f"with a 'latest' file{hint}; check the path (load: / --checkpoint)")
    found = iteration_dir(path, iteration)
    if not found.is_dir():
        raise CheckpointError(f"{marker} names iteration {iteration}, but {found} does not "
                              f"exist; {_recovery_hint(found)}")
    check_readable(found)
    return found


# Directories beside the checkpoints that are none, by suffix: what each is.
_NOT_CHECKPOINTS = {
    ".partial": "the unfinished save of an interrupted run",
    ".deleting": "set aside for deletion (an older checkpoint keep_checkpoints is deleting, or an "
                 "unfinished save; a killed run may have cut the deletion short)",
}


def check_readable(ckpt: Path) -> None:
    """Every file of the checkpoint is present and as long as its index says (no data is read)."""
    from torch.distributed.checkpoint import FileSystemReader

    latest = ckpt.parent / LATEST_NAME

    def hint() -> str:  # lists the save directory: only for an error
        return _recovery_hint(ckpt)

    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist; check the path (load: / "
                              "--checkpoint)")
    what = next((what for suffix, what in _NOT_CHECKPOINTS.items()
                 if ckpt.name.endswith(suffix)), None)
    if what is not None:
        raise CheckpointError(
            f"{ckpt} is {what}, not a checkpoint; pass the save directory {ckpt.parent} for its "
            f"newest complete one (named by {latest}), or one of its iter_ directories")
    marker = ckpt / "metadata.json"
    if not marker.exists() and any(ckpt.glob("mp_rank_*/model_optim_rng.pt")):
        raise CheckpointError(
            f"{ckpt} is in Megatron-LM's torch format (--ckpt-format torch: "
            "mp_rank_*/model_optim_rng.pt), which is not read here (only torch_dist, "
            "Megatron-LM's default); rewrite it by rerunning its training command with --load "
            "of it, --ckpt-format torch --ckpt-convert-format torch_dist --ckpt-convert-save NEW, "
            "then pass NEW/torch_dist")
    try:
        json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{marker} is missing or unreadable ({type(err).__name__}), so {ckpt} is not a "
            f"complete checkpoint; {hint()}") from None
    index = ckpt / ".metadata"
    try:
        storage = FileSystemReader(str(ckpt)).read_metadata().storage_data
    except Exception as err:  # noqa: BLE001 - a truncated pickle raises almost anything
        raise CheckpointError(
            f"{index} (the index of the checkpoint's tensors) is missing, truncated or corrupt "
            f"({type(err).__name__}: {first_sentence(err)}); {ckpt} cannot be loaded; {hint()}"
        ) from None
    needed: dict[str, int] = {}
    for item in storage.values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0),
                                         item.offset + item.length)
    for name, size in sorted(needed.items()):
        data_file = ckpt / name
        if not data_file.exists():
            raise CheckpointError(f"{data_file} is missing, so {ckpt} is incomplete; {hint()}")
        if data_file.stat().st_size < size:
            raise CheckpointError(
                f"{data_file} is truncated ({data_file.stat().st_size} bytes, its index needs "
                f"{size}), so {ckpt} is incomplete; {hint()}")


# ---- loading ------------------------------------------------------------------------------------

def load(path: str | Path, model_chunks, optimizer=None, weights_only: bool = False) -> dict:
    """Load into the (possibly differently laid out) model; returns the extra state dict.

    Loads the optimizer only when one is given, the checkpoint has it and not ``weights_only``
    (a fine-tune: the optimizer starts anew from the loaded weights).
    """
    ckpt = resolve(path)
    chunks = [_unwrap(c) for c in model_chunks]
    state = model_sharded_state_dict(chunks)
    _check_shapes(ckpt, state)
    common = _read(ckpt, dist_checkpointing.load_common_state_dict)
    if optimizer is not None and not weights_only and "has_optimizer" not in common \
            and "optimizer" in common:
        raise CheckpointError(
            f"{ckpt} was saved by Megatron-LM's training loop, whose optimizer state is not read "
            "here: the run would continue at its iteration with a new optimizer; set finetune: "
            "true to start from its weights at iteration 0, or continue it with Megatron-LM's "
            "--load")
    load_optimizer = optimizer is not None and common.get("has_optimizer") and not weights_only
    bridges = []
    if load_optimizer:
        _check_optimizer_format(ckpt, common, optimizer)
        create_adam_state(optimizer)
        bridges = precision.bridges(_saved_sub_states(common), _sub_optimizers(optimizer))
        with precision.saved_structure(bridges), empty_adams_report_a_step(optimizer):
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                              metadata=OPTIMIZER_METADATA)
    state["extra"] = {}
    state["iteration"] = 0
    # Keys the model asks for but the checkpoint lacks are dropped and returned (not an error
    # yet): Transformer Engine keeps FP8 metadata in `_extra_state` objects that checkpoints
    # written without it (e.g. on a CPU) do not have.
    loaded, _, absent = _read(ckpt, lambda c: dist_checkpointing.load(
        state, c, strict=StrictHandling.RETURN_UNEXPECTED))
    absent = sorted(k for k in absent if not k.endswith("_extra_state"))
    if absent:
        raise CheckpointError(
            f"{ckpt} lacks {len(absent)} tensors this model needs ({', '.join(absent[:3])}"
            f"{', ...' if len(absent) > 3 else ''}); it was written by a different model or "
            "without optimizer state")
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(
                f"{ckpt} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    if load_optimizer:
        for bridge, sub_state in zip(bridges, _sub_states(optimizer, loaded["optimizer"])):
            if bridge:
                bridge.read_masters(lambda request: _read(
                    ckpt, lambda c: dist_checkpointing.load(request, c)))
                bridge.to_current_structure(sub_state)
        _adopt_current_hyperparameters(ckpt, optimizer, loaded["optimizer"])
        _load_optimizer_state(optimizer, loaded["optimizer"])
    elif optimizer is not None:
        # Weights only (from-hf's checkpoints, a fine-tune): a bf16/fp16 optimizer's fp32 main copies
        # still hold the initial weights, which its first step would copy back over the loaded.
        optimizer.reload_model_params()
    _check_finite(ckpt, chunks, optimizer if load_optimizer else None)
    extra = dict(loaded.get("extra") or {})
    extra["iteration"] = loaded.get("iteration", 0)
    return extra


def _check_finite(ckpt: Path, chunks, optimizer) -> None:
    """Refuse, on every rank, values holding NaN or inf: saves write finite weights only, so the
    file is damaged, and training from it would fail at once and blame the learning rate."""
    tensors = [(name, param) for chunk in chunks for name, param in chunk.named_parameters()]
    for sub in _sub_optimizers(optimizer) if optimizer is not None else ():
        inner = getattr(sub, "optimizer", None)
        for param, state in getattr(inner, "state", {}).items():
            tensors += [(f"the optimizer's {key} of a {list(param.shape)} parameter", value)
                        for key, value in state.items()
                        if torch.is_tensor(value) and value.is_floating_point()]
        for group in getattr(inner, "param_groups", ()):
            tensors += [(f"the optimizer's copy of a {list(param.shape)} parameter", param)
                        for param in group["params"]]
    finite = torch.stack([t.detach().isfinite().all() for _, t in tensors]).cpu() if tensors \
        else torch.ones(0, dtype=torch.bool)  # one host sync
    bad = next((name for (name, _), ok in zip(tensors, finite.tolist()) if not ok), None)
    found = [bad]
    if dist.is_initialized() and dist.get_world_size() > 1:  # ranks hold different shards
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
    bad = next((name for name in found if name is not None), None)
    if bad is not None:
        raise CheckpointError(
            f"{ckpt} holds NaN or inf values ({bad}); saves write finite values only, so its "
            f"files are damaged; {_recovery_hint(ckpt)}")


def _read(ckpt: Path, reader):
    """Run a Megatron read of `ckpt`, turning a low-level failure into a CheckpointError."""
    try:
        return reader(str(ckpt))
    except CheckpointError:
        raise
    # torch.distributed.checkpoint raises many kinds, and CheckpointException (a BaseException)
    # with each rank's failure inside.
    except (Exception, CheckpointException) as err:  # noqa: BLE001
        cause = root_cause(err)
        raise CheckpointError(
            f"{ckpt} could not be read ({type(cause).__name__}: {first_sentence(cause, 200)}); the "
            f"checkpoint is damaged; {_recovery_hint(ckpt)}"
        ) from None


def sharded_tensors(state: dict):
    """The ShardedTensors of a sharded state dict, those its factories build included."""
    for item in nested_values(state):
        if isinstance(item, ShardedTensorFactory):
            yield from (t for t in nested_values(item.build()) if isinstance(t, ShardedTensor))
        elif isinstance(item, ShardedTensor):
            yield item


def _check_shapes(ckpt: Path, state: dict) -> None:
    """Name the first model tensor whose global shape differs from the checkpoint's."""
    saved = _read(ckpt, dist_checkpointing.load_tensors_metadata)
    for tensor in sharded_tensors(state):
        if tensor.key in saved and tuple(saved[tensor.key].global_shape) != tensor.global_shape:
            raise CheckpointError(
                f"{ckpt} was written for a different model: {tensor.key} has shape "
                f"{list(saved[tensor.key].global_shape)} there and {list(tensor.global_shape)} "
                "in this model; load it with the model settings it was saved with (its run.yaml)")


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _sub_states(optimizer, optimizer_state) -> list[dict]:
    """One saved state dict per sub-optimizer (a ChainedOptimizer of one saves it unwrapped)."""
    subs = _sub_optimizers(optimizer)
    return [optimizer_state] if len(subs) == 1 else [optimizer_state[i] for i in range(len(subs))]


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(sub, DistributedOptimizer) for sub in _sub_optimizers(optimizer))


def _saved_sub_states(common: dict) -> list:
    """The common (non-tensor) saved state of each sub-optimizer."""
    saved = common.get("optimizer") or {}
    return list(saved.values()) if isinstance(saved, dict) and 0 in saved else [saved]


def _check_optimizer_format(ckpt: Path, common: dict, optimizer) -> None:
    """The distributed and the standard optimizer save their state differently."""
    saved_distributed = any(isinstance(s, dict) and "param_state_sharding_type" in s
                            for s in _saved_sub_states(common))
    if saved_distributed != _is_distributed(optimizer):
        was = "true" if saved_distributed else "false"
        raise CheckpointError(
            f"{ckpt} holds the optimizer state of use_distributed_optimizer: {was}, which this "
            f"run does not use; resume with use_distributed_optimizer={was}")


def create_adam_state(optimizer) -> None:
    """Create Adam's per-parameter state (the moments; torch's Adam: and step) that it otherwise
    creates on its first step. Megatron's optimizers save and load the state Adam has: before
    its first update (fp16 skips the steps whose gradients overflow) the distributed optimizer
    failed to save, the standard one saved no moments, and without Transformer Engine or apex
    the distributed one could not load (it reads torch Adam's per-parameter `step` to build the
    state dict it loads into). The zeros are what Adam would create; a load overwrites them.
    TE's and apex's FusedAdam get theirs from the ``init_state_fn`` Megatron gives them."""
    for sub in _sub_optimizers(optimizer):
        if _is_fused_adam(getattr(sub, "optimizer", None)):
            sub.init_state_fn(sub.optimizer, sub.config)
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param].update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                        exp_avg_sq=torch.zeros_like(param))


@contextlib.contextmanager
def empty_adams_report_a_step(optimizer):
    """An Adam holding no parameter on this rank (the expert one on a pipeline stage of dense
    layers only: moe_first_k_dense) reports the step of the others here. When that stage is
    rank 0, whose copy of the common state every rank loads, the expert parameters resumed
    without a step otherwise: with TE's or apex's FusedAdam, which keep it in each parameter
    group and advance only the groups holding parameters, silently from step 1 (every group gets
    the rank's step, 0 before the first update). Megatron's optimizers read torch Adam's from
    the per-parameter state, which such an Adam lacks: the distributed optimizer failed to
    save, the standard one saved no step (it reports a state of its own, saved and dropped on
    load)."""
    fused = [inner for inner in _adams(optimizer) if _is_fused_adam(inner)]
    group_steps = [group["step"] for inner in fused for group in inner.param_groups
                   if group["params"] and "step" in group]
    for group in (group for inner in fused for group in inner.param_groups):
        if not group["params"] or "step" not in group:
            group["step"] = group_steps[0] if group_steps else 0
    adams = _torch_adams(optimizer)
    steps = [state["step"] for inner in adams for state in inner.state.values()
             if "step" in state]
    step = steps[0].clone() if steps else torch.tensor(0.0)
    empty = [inner for inner in adams
             if not any(group["params"] for group in inner.param_groups)]
    for inner in empty:
        inner.state_dict = lambda inner=inner: {
            **type(inner).state_dict(inner), "state": {0: {"step": step}}}
    try:
        yield
    finally:
        for inner in empty:
            del inner.state_dict


def _adopt_current_hyperparameters(ckpt: Path, optimizer, optimizer_state) -> None:
    """Give each saved parameter group the current group's hyper-parameters.

    Megatron pairs saved and current groups by their settings (max_lr, min_lr, ...) and torch
    then restores the saved settings, so a resume with another lr either fails to match or
    silently trains with the old values. Groups are built in the same order on every layout, so
    they pair by position; their structure (expert or dense, weight-decay multiplier) must agree.
    """
    for sub, sub_state in zip(_sub_optimizers(optimizer), _sub_states(optimizer, optimizer_state)):
        current = sub.optimizer.param_groups
        inner = sub_state if "param_groups" in sub_state else sub_state["optimizer"]
        saved = inner["param_groups"]
        same = len(saved) == len(current) and all(
            s.get(k) == c.get(k) for s, c in zip(saved, current) for k in _GROUP_STRUCTURE)
        if not same:
            raise CheckpointError(
                f"{ckpt}: the optimizer's parameter groups differ from this run's "
                f"({len(saved)} saved, {len(current)} now); the checkpoint was written for a "
                "different model")
        for saved_group, current_group in zip(saved, current):
            # "step" is state (Megatron keeps torch Adam's step count in the groups), not a
            # hyper-parameter.
            saved_group.update({k: v for k, v in current_group.items()
                                if k not in ("params", "step")})


def _load_optimizer_state(optimizer, optimizer_state) -> None:
    """``optimizer.load_state_dict`` with Adam's step where this run's Adam keeps it
    (``adam_steps_where_kept``). Megatron's distributed optimizer copies every tensor of torch
    Adam's per-parameter state from the loaded one, which holds no ``step`` (the step is kept in
    the parameter groups): the per-parameter state is loaded here with the ``step`` tensors set
    aside."""
    param_states = [sub_state.pop("param_state", None)
                    for sub_state in _sub_states(optimizer, optimizer_state)]
    with adam_steps_where_kept(optimizer):
        optimizer.load_state_dict(optimizer_state)
    for inner in _adams(optimizer):  # what an Adam without parameters reported on save
        for key in [k for k in inner.state if not torch.is_tensor(k)]:
            del inner.state[key]
    for sub, param_state in zip(_sub_optimizers(optimizer), param_states):
        if param_state is None:
            continue
        with adam_steps_set_aside(sub):
            sub.load_parameter_state_from_fully_reshardable(param_state)


@contextlib.contextmanager
def adam_steps_set_aside(distributed_optimizer):
    """Without torch Adam's per-parameter ``step``, which Megatron's fully-reshardable load
    would copy from a loaded state that keeps it in the groups instead."""
    state = distributed_optimizer.optimizer.state
    steps = {param: state[param].pop("step") for param in state if "step" in state[param]}
    try:
        yield
    finally:
        for param, step in steps.items():
            state[param]["step"] = step


@contextlib.contextmanager
def adam_steps_where_kept(optimizer):
    """While loading: each Adam gets the loaded step count where it keeps it, whichever Adam
    saved it. torch's Adam / AdamW keeps it per parameter, a tensor in each one's state (Megatron
    saves it once, its distributed optimizer as a float in the groups); Transformer Engine's
    and apex's FusedAdam keep it in each parameter group, an int. As loaded, a float failed
    FusedAdam's first step (its kernel takes an int), a per-parameter one failed TE's
    load_state_dict (KeyError 'step') and apex dropped it (bias correction started over), and
    torch's Adam found none in a FusedAdam checkpoint (KeyError 'step' at its first step).
    Each parameter gets its own tensor: Megatron's distributed optimizer loads one object into
    all of them, which Adam then advanced once per parameter and step. No step in the
    checkpoint (saved before any update was applied): 0. Each loaded group also gets the
    settings only this run's Adam has: torch loads the saved groups in place of its own, and
    FusedAdam resuming a checkpoint of torch's AdamW in Megatron-LM's loop failed its first step
    (KeyError 'bias_correction')."""
    handles = [inner.register_load_state_dict_pre_hook(_put_adam_steps_where_kept)
               for inner in _adams(optimizer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _put_adam_steps_where_kept(inner, state_dict) -> None:
    """The pre-hook of ``adam_steps_where_kept``: changes ``state_dict``'s dicts in place (TE's
    FusedAdam.load_state_dict reads the state from the dict it was given, not the hook's)."""
    for saved, current in zip(state_dict["param_groups"], inner.param_groups):
        saved.update({k: v for k, v in current.items() if k not in saved})
    steps = [state.pop("step") for state in state_dict["state"].values() if "step" in state]
    steps += [g["step"] for g in state_dict["param_groups"] if g.get("step") is not None]
    step = int(steps[0]) if steps else 0
    if isinstance(inner, torch.optim.Adam):
        for state in state_dict["state"].values():
            if state:
                state["step"] = torch.tensor(float(step))
    else:
        for group in state_dict["param_groups"]:
            group["step"] = step


def _torch_adams(optimizer) -> list:
    """The torch Adam / AdamW optimizers inside Megatron's."""
    return [inner for inner in _adams(optimizer) if isinstance(inner, torch.optim.Adam)]


def _adams(optimizer) -> list:
    """The Adam optimizers inside Megatron's: torch's Adam / AdamW (without Transformer Engine
    and apex), else TE's or apex's FusedAdam."""
    inners = [getattr(sub, "optimizer", None) for sub in _sub_optimizers(optimizer)]
    return [inner for inner in inners
            if isinstance(inner, torch.optim.Adam) or _is_fused_adam(inner)]


def _is_fused_adam(inner) -> bool:
    """TE's or apex's FusedAdam, told by its class's name, which both give theirs: importing
    either to compare fails where it is not installed."""
    return any(cls.__name__ == "FusedAdam" for cls in type(inner).__mro__)


def read_run_config_yaml(path: str | Path) -> str:
    ckpt = resolve(path)
    config_file = ckpt / RUN_CONFIG_NAME
    if not config_file.exists():
        raise CheckpointError(f"{config_file} is missing; the checkpoint does not say its model")
    return config_file.read_text()
