"""The converter's readers and writers, which never hold the whole model: memory stays near one
layer (plus one output shard for safetensors), whatever the model size.

* ``SafetensorsReader``: a Hugging Face directory's tensors, one at a time (``safe_open``).
* ``write_safetensors_shards``: tensors computed on demand, written shard by shard.
* ``DistCheckpointReader``: one tensor of a Megatron dist checkpoint at its global shape, read
  with torch.distributed.checkpoint (only that tensor's chunks; no model, no process group).
* ``StreamingSaveStrategy``: Megatron's torch_dist save, with each tensor computed when DCP
  writes it: a model built on the meta device gives the checkpoint's keys, chunks and objects,
  so the result is the checkpoint a real model would write, loadable on any layout.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from dsmoe_megatron.cli import default_file_mode, first_sentence
from dsmoe_megatron.hf.mapping import DTYPE_NAMES, ConversionError, canonical_name

# ------------------------------------------------------------------------------------------
# Hugging Face safetensors
# ------------------------------------------------------------------------------------------


class SafetensorsReader:
    """Lazily reads the tensors of a Hugging Face directory (index + shards, or one file).

    One file is open at a time: safe_open maps the whole file, and a file's tensors are read
    together (the mappings go layer by layer)."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            files = {name: hf_dir / f for name, f in _read_weight_map(index).items()}
            for path in set(files.values()):
                if not path.exists():
                    raise ConversionError(f"{path.name}, listed in the index, is missing from "
                                          f"{hf_dir}: download it again")
        else:
            candidates = sorted(hf_dir.glob("*.safetensors"))
            if not candidates:
                pickles = sorted(p.name for p in hf_dir.glob("*.bin")) + \
                    sorted(p.name for p in hf_dir.glob("*.pt"))
                hint = (f" (found {pickles}: pickle checkpoints are not read; convert them to "
                        "safetensors first)") if pickles else ""
                raise ConversionError(f"no safetensors weights in {hf_dir}{hint}")
            files = {}
            for path in candidates:
                for name in self._open(path).keys():
                    if name in files:
                        raise ConversionError(
                            f"{name} is in both {files[name].name} and {path.name}, and {hf_dir} "
                            "has no model.safetensors.index.json to say which is the model's; "
                            f"move the other file out of {hf_dir}")
                    files[name] = path
        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}  # safetensors' names: "BF16", "F32", ...
        for path in dict.fromkeys(files.values()):
            handle = self._open(path)
            held = set(handle.keys())
            for name in (n for n, p in files.items() if p == path):
                if name not in held:
                    raise ConversionError(
                        f"{index} places tensor {name} in {path.name}, which does not hold it: "
                        "the index and the shards are not of the same model; download them again")
                try:
                    tensor = handle.get_slice(name)
                    self.shapes[name] = tuple(tensor.get_shape())
                    self.dtypes[name] = tensor.get_dtype()
                except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                    raise ConversionError(f"cannot read tensor {name} from {path}: {err}") from err
        self._current: tuple[Path, object] | None = None

    @staticmethod
    def _open(path: Path):
        from safetensors import SafetensorError, safe_open

        try:
            try:  # pread: each tensor in its own buffer, nothing of the file mapped or cached
                return safe_open(str(path), framework="pt", backend="pread")
            except TypeError:  # safetensors < 0.8: memory-mapped
                return safe_open(str(path), framework="pt")
        except SafetensorError as err:
            raise ConversionError(
                f"{path} is not a readable safetensors file ({err}); it is probably truncated "
                "or was not fully downloaded: copy it again") from err
        except OSError as err:
            raise ConversionError(f"cannot open {path}: {err}") from err

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``; NaN/inf values are refused."""
        path = self.files[name]
        if self._current is None or self._current[0] != path:
            self._current = None  # unmap the previous file first
            self._current = (path, self._open(path))
        try:
            tensor = self._current[1].get_tensor(name)
        except Exception as err:  # noqa: BLE001
            raise ConversionError(f"cannot read tensor {name} from {path}: {err}") from err
        check_finite(name, tensor, str(path), "these weights are broken; download or export "
                     "the model again")
        return tensor


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ConversionError(f"{index} is not a safetensors index (a JSON object with a "
                              f"'weight_map' of tensor name -> file): {err}; replace it with "
                              "a complete copy") from err
    if not isinstance(weight_map, dict) or not all(isinstance(f, str)
                                                   for f in weight_map.values()):
        raise ConversionError(f"{index}: weight_map must map tensor names to file names")
    return weight_map


def plan_shards(shapes: Mapping[str, Sequence[int]], dtype: torch.dtype,
                max_shard_size: int) -> list[list[str]]:
    """Consecutive names, each group at most ``max_shard_size`` bytes (a bigger tensor alone)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_safetensors_shards(sources: Mapping[str, Callable[[], torch.Tensor]],
                             shapes: Mapping[str, Sequence[int]], out_dir: Path,
                             max_shard_size: int, dtype: torch.dtype,
                             allow_non_finite: bool = False) -> list[str]:
    """Write ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, computing
    each tensor (``sources[name]()``, in ``shapes`` order) only for the shard that holds it.
    Refuses a tensor with NaN/inf unless ``allow_non_finite``."""
    from safetensors.torch import save_file

    groups = plan_shards(shapes, dtype, max_shard_size)
    total, weight_map, files = 0, {}, []
    for index, names in enumerate(groups, start=1):
        filename = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            t = _exported(name, sources[name](), dtype, allow_non_finite)
            shard[name] = t
            total += t.numel() * t.element_size()
            weight_map[name] = filename
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        default_file_mode(out_dir / filename)
        files.append(filename)
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _exported(name: str, t: torch.Tensor, dtype: torch.dtype,
              allow_non_finite: bool) -> torch.Tensor:
    out = t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
    if allow_non_finite or torch.isfinite(out).all():
        return out
    check_finite(name, t, "the checkpoint", "these weights are broken; export an earlier "
                 "checkpoint, or pass --allow-non-finite to write them anyway")
    check_fits(name, t, out, "export with --dtype bf16 or fp32")
    return out  # not reached: t or out is not finite


def check_fits(name: str, t: torch.Tensor, out: torch.Tensor, fix: str) -> None:
    """Refuse ``out``, the finite tensor ``name`` (``t``) cast to a narrower dtype, where values
    overflowed it (bf16 or fp32 weights beyond fp16's range become inf)."""
    overflow = int((~torch.isfinite(out)).sum())
    if overflow:
        raise ConversionError(
            f"{name}: {overflow} of {out.numel()} values overflow {DTYPE_NAMES[out.dtype]} (the "
            f"largest is {float(t.abs().max()):.4g}); {fix}")


def check_finite(name: str, t: torch.Tensor, where: str, fix: str) -> None:
    """Refuse tensor ``name`` (read from ``where``) if it holds NaN or inf."""
    finite = torch.isfinite(t)
    if not finite.all():
        raise ConversionError(f"{name} has {int((~finite).sum())} non-finite values (NaN or "
                              f"inf) of {t.numel()} in {where}: {fix}")


# ------------------------------------------------------------------------------------------
# Megatron dist checkpoints (torch_dist)
# ------------------------------------------------------------------------------------------


# DCP says so on every call without a process group, which is what the converter means.
_SINGLE_PROCESS_WARNING = ".*assuming the intent is to (load|save) in a single process"


class _MetadataOnceReader(FileSystemReader):
    """DCP's reader, reading ``.metadata`` once for the many single-tensor loads."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self._metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


def _layer_of(name: str) -> str:
    match = re.match(r"decoder\.layers\.\d+\.", name)
    return match.group(0) if match else name


def _is_optimizer_key(key: str) -> bool:
    """Megatron's optimizer state: ``optimizer.*``, or ``chained_<i>.optimizer.*`` when MoE
    expert parameters give it a ChainedOptimizer (every dsmoe-train checkpoint)."""
    return re.match(r"(chained_\d+\.)?optimizer\.", key) is not None


class DistCheckpointReader:
    """The model tensors of a Megatron dist checkpoint saved on any layout, each read on demand
    at its global shape under its local-spec name (``mapping.canonical_name``); the optimizer's
    tensors and non-tensor objects are ignored. ``get`` keeps the tensors of the layer it last
    read, so a mapping that slices one tensor several times reads it once."""

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        self._reader = _MetadataOnceReader(ckpt)
        try:
            metadata = self._reader.read_metadata()
        except Exception as err:  # noqa: BLE001 - any unreadable metadata gets the same answer
            raise ConversionError(f"cannot read the checkpoint metadata in {ckpt}: {err}") from err
        self._files = {}  # key -> the .distcp files holding its chunks
        for index, info in metadata.storage_data.items():
            self._files.setdefault(index.fqn, set()).add(info.relative_path)
        self._entries: dict[str, tuple[str, TensorStorageMetadata]] = {
            canonical_name(key): (key, entry)
            for key, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata) and not _is_optimizer_key(key)
        }
        self._layer, self._cache = None, {}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(entry.size) for name, (_, entry) in self._entries.items()}

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1].properties.dtype

    def get(self, name: str) -> torch.Tensor:
        layer = _layer_of(name)
        if layer != self._layer:
            self._layer, self._cache = layer, {}
        if name not in self._cache:
            self._cache[name] = self._load(name)
        return self._cache[name]

    def _load(self, name: str) -> torch.Tensor:
        key, entry = self._entries[name]
        tensor = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
                dcp.load({key: tensor}, storage_reader=self._reader, no_dist=True)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - damaged .distcp files
            files = ", ".join(str(self.ckpt / f) for f in sorted(self._files.get(key, ())))
            raise ConversionError(
                f"cannot read {key} from {files or self.ckpt}: {_root_cause(err)}; the file is "
                "damaged; export another iteration (--checkpoint SAVE/iter_XXXXXXX)") from err
        return tensor


def _root_cause(err: BaseException) -> str:
    """DCP wraps a reader's error, with its traceback, in a CheckpointException per rank."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    return f"{type(err).__name__}: {first_sentence(err)}"


class _LazyPlanner(MCoreSavePlanner):
    """Megatron's save planner, with each tensor chunk computed when the writer asks for it."""

    def __init__(self, tensor_of: Callable[[str], torch.Tensor], **kwargs):
        super().__init__(**kwargs)
        self._tensor_of = tensor_of
        self._last: tuple[str, torch.Tensor] | None = None  # a tensor saved in several chunks

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        key = write_item.index.fqn
        if self._last is None or self._last[0] != key:
            self._last = None
            full = self._tensor_of(key)
            if tuple(full.shape) != tuple(write_item.tensor_data.size):
                raise ConversionError(f"internal error: {key} is {tuple(full.shape)}, the "
                                      f"checkpoint expects {tuple(write_item.tensor_data.size)}")
            self._last = (key, full)
        chunk = self._last[1]
        for dim, (offset, size) in enumerate(zip(write_item.tensor_data.chunk.offsets,
                                                 write_item.tensor_data.chunk.sizes)):
            chunk = chunk.narrow(dim, offset, size)
        return chunk.contiguous()


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """``dist_checkpointing.save`` strategy for a model whose parameters are on the meta device:
    ``tensor_of(checkpoint_key)`` gives each full tensor when it is written, one at a time.

    Megatron's own strategy turns the sharded state dict into DCP items the same way, but its
    writer stages every tensor in memory first. DCP's FileSystemWriter resolves them one by one
    and keeps those of a file until the file is closed, so each item gets its own file (the
    checkpoint's metadata says where each one is). Single process only (the converter's)."""

    def __init__(self, tensor_of: Callable[[str], torch.Tensor]):
        super().__init__()
        self.tensor_of = tensor_of

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                   self.keep_only_main_replica)
        planner = _LazyPlanner(self.tensor_of, dedup_replicated_tensors=False,
                               flatten_state_dict=False, flatten_sharded_tensors=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            dcp.save(mcore_to_pyt_state_dict(by_key, is_loading=False),
                     storage_writer=FileSystemWriter(str(checkpoint_dir),
                                                     single_file_per_rank=False),
                     planner=planner, no_dist=True)
