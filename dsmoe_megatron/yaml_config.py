"""Run configuration files: YAML -> (DeepSeekMoEConfig, ParallelLayout, TrainingArgs).

Every file follows Megatron-LM's YAML layout::

    language_model:      # TransformerConfig fields, Megatron-core's own names
      num_layers: 28
      hidden_size: 2048
      num_moe_experts: 64
      ...
    model_parallel:      # parallel sizes and precision
      tensor_model_parallel_size: 1
      expert_model_parallel_size: 8
      bf16: true
    deepseekmoe:         # the fields Megatron-core has no name for
      moe_num_shared_experts: 2
      moe_first_k_dense: 1
    micro_batch_size: 1  # training settings are top-level keys (TrainingArgs)
    lr: 4.2e-4
    ...

Missing fields take TransformerConfig's own dataclass defaults, overlaid with
``config.deepseek_defaults()`` (SwiGLU, RMSNorm, no biases, no dropout, DeepSeekMoE routing).
Unknown keys and wrongly typed values are rejected with the section, the key and the nearest
valid name. ``load_run_config(path, ["language_model.num_layers=4", "lr=1e-3"])`` applies
``key=value`` overrides (values parsed as YAML) before anything is checked.

Precision: ``bf16: true`` sets ``params_dtype=torch.bfloat16`` (``fp16`` likewise); the
pipeline P2P dtype follows ``params_dtype``. ``activation_func`` is not configurable: the
FFNs are SwiGLU.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import torch
import yaml
from megatron.core.model_parallel_config import ModelParallelConfig

from dsmoe_megatron import config as _config_module
from dsmoe_megatron.config import ConfigError, DeepSeekMoEConfig, deepseek_defaults
from dsmoe_megatron.runtime import ParallelLayout

__all__ = [
    "LR_DECAY_STYLES",
    "RunConfig",
    "SECTIONS",
    "TrainingArgs",
    "YamlConfigError",
    "check_world_size",
    "dump_run_config",
    "load_run_config",
    "parse_overrides",
    "run_config_from_dict",
    "run_config_to_dict",
    "section_of",
]

SECTIONS = ("language_model", "model_parallel", "deepseekmoe")
LR_DECAY_STYLES = ("step", "cosine", "constant")


class YamlConfigError(ConfigError):
    """A run-config file (or override) that cannot be used; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Training settings (the top-level keys)


@dataclass
class TrainingArgs:
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    """Sequences per optimizer step; None: micro_batch_size x data-parallel size."""
    seq_length: int = 2048
    max_position_embeddings: int | None = None
    """None: seq_length."""
    vocab_size: int | None = None
    """The tokenizer's vocabulary (unpadded; Megatron pads it); None: the byte-level tokenizer's."""
    lr: float = 3.0e-4
    min_lr: float = 0.0
    """Floor of the cosine schedule (step and constant schedules ignore it)."""
    lr_warmup_iters: int = 0
    lr_decay_style: str = "step"
    """step (the paper's: x lr_step_decay_factor at each lr_step_decay_at), cosine or constant."""
    lr_step_decay_at: list[float] = field(default_factory=lambda: [0.8, 0.9])
    """Fractions of train_iters where the step schedule multiplies the lr by the factor."""
    lr_step_decay_factor: float = 0.316
    train_iters: int = 1000
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    seed: int = 1234
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    """None: save only at the end of training (when ``save`` is set)."""
    eval_interval: int | None = 1000
    """None: no evaluation during training."""
    eval_iters: int = 10
    log_interval: int = 10
    data_path: list[str] | None = None
    """Megatron blend (["path"] or ["0.7", "a", "0.3", "b"]); None: the shipped corpus."""
    split: str = "969,30,1"
    """train,valid,test weights (Megatron's --split)."""
    tensorboard_dir: str | None = None
    # Data parallelism and mixed precision (Megatron-LM's names).
    use_distributed_optimizer: bool = True
    """Shard the optimizer state over data-parallel ranks (ZeRO-1). A checkpoint resumes with the
    same setting; under any layout."""
    overlap_grad_reduce: bool | None = None
    """Reduce gradients in buckets during the backward pass; null: on with GPUs, off on CPU."""
    ddp_bucket_size: int | None = None
    """Parameters per gradient-reduction bucket; null: Megatron's default."""
    loss_scale: float | None = None
    """fp16 only: a constant loss scale; null: dynamic, starting at initial_loss_scale."""
    initial_loss_scale: float = 2.0**32

    def global_batch(self, data_parallel_size: int) -> int:
        return self.global_batch_size or self.micro_batch_size * data_parallel_size

    def num_microbatches(self, data_parallel_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch(data_parallel_size) // (self.micro_batch_size * data_parallel_size)

    def validate(self) -> None:
        def bad(key, msg):
            raise YamlConfigError(f"{key}: {msg}")

        for key in ("micro_batch_size", "seq_length", "train_iters", "vocab_size",
                    "max_position_embeddings"):
            value = getattr(self, key)
            if value is not None and value < 1:
                bad(key, f"must be >= 1 (got {value})")
        if self.global_batch_size is not None:
            if self.global_batch_size < 1 or self.global_batch_size % self.micro_batch_size:
                bad("global_batch_size",
                    f"{self.global_batch_size} must be a positive multiple of micro_batch_size "
                    f"({self.micro_batch_size})")
        max_pos = self.max_position_embeddings
        if max_pos is not None and max_pos < self.seq_length:
            bad("max_position_embeddings",
                f"{self.max_position_embeddings} is smaller than seq_length ({self.seq_length})")
        if not self.lr > 0:
            bad("lr", f"must be > 0 (got {self.lr})")
        if not 0 <= self.min_lr <= self.lr:
            bad("min_lr", f"must be between 0 and lr={self.lr} (got {self.min_lr})")
        if not 0 <= self.lr_warmup_iters <= self.train_iters:
            bad("lr_warmup_iters",
                f"must be between 0 and train_iters={self.train_iters} "
                f"(got {self.lr_warmup_iters})")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            near = difflib.get_close_matches(self.lr_decay_style, LR_DECAY_STYLES, n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            bad("lr_decay_style",
                f"{self.lr_decay_style!r} is not one of {', '.join(LR_DECAY_STYLES)}{hint}")
        points = list(self.lr_step_decay_at)
        if any(not 0 < p < 1 for p in points) or points != sorted(set(points)):
            bad("lr_step_decay_at",
                f"{points} must be increasing fractions of train_iters, each between 0 and 1")
        if not 0 < self.lr_step_decay_factor <= 1:
            bad("lr_step_decay_factor", f"must be in (0, 1] (got {self.lr_step_decay_factor})")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0 (got {self.weight_decay})")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                bad(key, f"must be in [0, 1) (got {getattr(self, key)})")
        if not self.adam_eps > 0:
            bad("adam_eps", f"must be > 0 (got {self.adam_eps})")
        if self.clip_grad < 0:
            bad("clip_grad", f"must be >= 0, 0 disables clipping (got {self.clip_grad})")
        for key in ("save_interval", "eval_interval", "log_interval"):
            value = getattr(self, key)
            if value is not None and value < 1:
                bad(key, f"must be >= 1 or null (got {value})")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            bad("ddp_bucket_size", f"must be >= 1 or null (got {self.ddp_bucket_size})")
        for key in ("loss_scale", "initial_loss_scale"):
            value = getattr(self, key)
            if value is not None and not 0 < value < math.inf:
                bad(key, f"must be a positive finite number (got {value})")
        if self.eval_iters < 0:
            bad("eval_iters", f"must be >= 0 (got {self.eval_iters})")
        if not re.fullmatch(r"\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*", self.split) or not any(
            float(x) > 0 for x in self.split.split(",")
        ):
            bad("split", f"{self.split!r} must be up to three non-negative weights such as "
                         "'969,30,1' (train,valid,test)")
        if self.data_path is not None:
            if not self.data_path:
                bad("data_path", "is an empty list; use null for the shipped corpus")
            if _is_number(self.data_path[0]) and (
                len(self.data_path) % 2
                or not all(_is_number(w) for w in self.data_path[::2])
            ):
                bad("data_path", f"{self.data_path} looks like a weighted blend but is not "
                                 "'weight, prefix' pairs")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class RunConfig:
    model: DeepSeekMoEConfig
    layout: ParallelLayout
    train: TrainingArgs
    source: dict
    """The merged YAML document (after overrides), as written next to checkpoints."""


# ---------------------------------------------------------------------------------------------
# The schema: which key lives in which section, with which type

_MODEL_HINTS = typing.get_type_hints(DeepSeekMoEConfig)
_TRAIN_HINTS = typing.get_type_hints(TrainingArgs)
_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(DeepSeekMoEConfig)}
_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainingArgs)}
_MP_CONFIG_FIELDS = {f.name for f in dataclasses.fields(ModelParallelConfig)}

DEEPSEEK_FIELDS = ("moe_num_shared_experts", "moe_first_k_dense", "moe_device_balance_coeff",
                   "moe_device_groups", "moe_expert_backend")
# TransformerConfig fields that describe the layout or the precision: model_parallel.
_PIPELINE_SPLIT_FIELDS = ("num_layers_in_first_pipeline_stage",
                          "num_layers_in_last_pipeline_stage",
                          "account_for_embedding_in_pipeline_split",
                          "account_for_loss_in_pipeline_split", "pipeline_model_parallel_layout")
_PRECISION_PREFIXES = ("fp8", "fp4")
_PRECISION_FIELDS = ("first_last_layers_bf16", "num_layers_at_start_in_bf16",
                     "num_layers_at_end_in_bf16")

# Keys that exist on the dataclass but are not YAML fields, with the reason.
NOT_CONFIGURABLE = {
    "activation_func": "not configurable: DeepSeekMoE's FFNs are SwiGLU (silu with "
                       "gated_linear_unit), fixed by deepseek_defaults()",
    "params_dtype": "not configurable: set model_parallel.bf16 or model_parallel.fp16",
    "pipeline_dtype": "not configurable: it follows params_dtype (model_parallel.bf16 / fp16)",
    "autocast_dtype": "not configurable: it follows params_dtype (model_parallel.bf16 / fp16)",
}
# In the schema, but only one value works with this plugin's runtime.
_FIXED_VALUES = {
    "context_parallel_size": (1, "context parallelism is not supported by dsmoe_megatron's "
                                 "runtime; use 1"),
}


def _yamlable(tp) -> bool:
    """Whether a value of this annotation can be written in YAML (no callables, dtypes...)."""
    if tp in (int, float, bool, str, type(None), Any, list, dict):
        return True
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType):
        return any(_yamlable(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, tuple, Sequence, typing.List, typing.Tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return all(_yamlable(a) for a in args) if args else True
    return False


def _build_schema() -> dict[str, dict[str, Any]]:
    lm, mp, dsm = {}, {}, {}
    for name in _MODEL_FIELDS:
        tp = _MODEL_HINTS.get(name, Any)
        if name.startswith("_") or name in NOT_CONFIGURABLE or not _yamlable(tp):
            continue
        if name in DEEPSEEK_FIELDS:
            dsm[name] = tp
        elif (name in _MP_CONFIG_FIELDS or name in _PIPELINE_SPLIT_FIELDS
              or name in _PRECISION_FIELDS or name.startswith(_PRECISION_PREFIXES)):
            mp[name] = tp
        else:
            lm[name] = tp
    return {"language_model": lm, "model_parallel": mp, "deepseekmoe": dsm}


SCHEMA = _build_schema()
TRAINING_KEYS = tuple(_TRAIN_FIELDS)
# Fields whose values must be present (TransformerConfig's 0 default cannot build a model).
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads")


def section_of(key: str) -> str | None:
    """The section of a model field (language_model, model_parallel or deepseekmoe); None for a
    top-level training key or a key the schema does not have."""
    for section in SECTIONS:
        if key in SCHEMA[section]:
            return section
    return None


def _home(key) -> str | None:
    """Where a key belongs: its section, "" for a top-level training key, None if unknown."""
    if key in _TRAIN_FIELDS:
        return ""
    return section_of(key) if isinstance(key, str) else None


def _model_default(name: str):
    defaults = deepseek_defaults()
    if name in defaults:
        return defaults[name]
    f = _MODEL_FIELDS[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# ---------------------------------------------------------------------------------------------
# Values: type checks with readable errors


class _Mismatch(Exception):
    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def _describe(value) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value),
                                                                       type(value).__name__)
    return f"{value!r} ({kind})"


def _convert(value, tp, lenient: bool):
    """``value`` checked (and converted) against annotation ``tp``; _Mismatch if it does not fit.

    ``lenient`` also accepts a string holding a number for a float field: YAML 1.1 (PyYAML)
    reads ``1e-3`` without a dot as a string.
    """
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch("null")
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if _yamlable(a)]
        # Exact matches in any arm first, then the lenient conversions.
        for attempt in ((False, True) if lenient else (False,)):
            for arm in arms:
                try:
                    return _convert(value, arm, attempt)
                except _Mismatch:
                    pass
        raise _Mismatch(" or ".join(dict.fromkeys(_expected(a) for a in arms)))
    if origin is Literal:
        for choice in get_args(tp):
            if type(choice) is type(value) and choice == value:
                return value
        raise _Mismatch(_expected(tp))
    if origin in (list, Sequence, typing.List):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_expected(tp))
        (arg,) = get_args(tp) or (Any,)
        return [_convert(v, arg, lenient) for v in value]
    if origin in (tuple, typing.Tuple):
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_expected(tp))
        if args and args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], lenient) for v in value)
        if args and len(args) != len(value):
            raise _Mismatch(_expected(tp))
        return tuple(_convert(v, a, lenient) for v, a in zip(value, args or [Any] * len(value)))
    if tp in (list, dict):
        if isinstance(value, tp):
            return value
        raise _Mismatch("a list" if tp is list else "a mapping")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if lenient and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
        raise _Mismatch("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("a string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value == member.name or (isinstance(value, str) and value == str(member.value)):
                return member
        raise _Mismatch(_expected(tp))
    raise _Mismatch(f"a {getattr(tp, '__name__', tp)} (not settable from YAML)")


def _expected(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    if origin in (list, Sequence, typing.List):
        (arg,) = get_args(tp) or (Any,)
        return f"a list of {_plural(arg)}"
    if origin in (tuple, typing.Tuple):
        return "a list of " + ", ".join(_expected(a) for a in get_args(tp) if a is not Ellipsis)
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(a) for a in get_args(tp) if _yamlable(a))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.name for m in tp)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null", Any: "any value", list: "a list", dict: "a mapping"
            }.get(tp, str(tp))


def _plural(tp) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(
        tp, _expected(tp))


def _check_value(where: str, value, tp):
    try:
        return _convert(value, tp, lenient=True)
    except _Mismatch as err:
        raise YamlConfigError(
            f"{where}: expected {err.expected}, got {_describe(value)}") from None


def _unknown_key(where_prefix: str, key: str, valid: Iterable[str]) -> YamlConfigError:
    """The error for an unknown key: the nearest valid name, or the section it belongs in."""
    name = f"{where_prefix}{key}"
    if key in NOT_CONFIGURABLE:
        return YamlConfigError(f"{name}: {NOT_CONFIGURABLE[key]}")
    home = _home(key)
    if home is not None:
        target = f"{home}.{key}" if home else f"the top level ({key}: ...)"
        return YamlConfigError(f"{name}: unknown key here; it belongs in {target}")
    if not isinstance(key, str):
        return YamlConfigError(f"{name}: keys must be strings")
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else ""
    return YamlConfigError(f"{name}: unknown key{hint}")


# ---------------------------------------------------------------------------------------------
# Overrides


def parse_overrides(overrides: str | Iterable[str]) -> dict:
    """``["language_model.num_layers=4", "lr=1e-3"]`` -> the nested dict they describe.

    A key is ``section.key`` or a top-level training key; a section-less key that exists in
    exactly one section (``num_layers=4``) is placed there. Values are parsed with
    ``yaml.safe_load`` (``null``, ``[1, 2]``, ``true``...). ``section={...}`` sets several keys.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out: dict = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise YamlConfigError(f"override {item!r}: expected key=value (e.g. lr=1e-3 or "
                                  "language_model.num_layers=4)")
        key, _, text = item.partition("=")
        key = key.strip()
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise YamlConfigError(
                f"override {item!r}: the value is not valid YAML ({err})") from None
        parts = key.split(".")
        where = f"override {item!r}: "
        if len(parts) == 1:
            (name,) = parts
            if name in SECTIONS:
                if not isinstance(value, dict):
                    raise YamlConfigError(f"{where}{name} takes a mapping such as "
                                          f"{name}={{key: value}}")
                for sub_key, sub_value in value.items():
                    _check_known(where, name, sub_key)
                    out.setdefault(name, {})[sub_key] = sub_value
                continue
            if name in _TRAIN_FIELDS:
                out[name] = value
                continue
            owners = [s for s in SECTIONS if name in SCHEMA[s]]
            if len(owners) > 1:
                raise YamlConfigError(f"{where}{name} exists in {' and '.join(owners)}; write "
                                      f"SECTION.{name}=...")
            if not owners:
                raise _prefixed(where, _unknown_key("", name, _all_keys()))
            out.setdefault(owners[0], {})[name] = value
        elif len(parts) == 2:
            section, name = parts
            if section not in SECTIONS:
                near = difflib.get_close_matches(section, SECTIONS, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]}?" if near else ""
                raise YamlConfigError(f"{where}{section}: unknown section (sections: "
                                      f"{', '.join(SECTIONS)}){hint}")
            _check_known(where, section, name)
            out.setdefault(section, {})[name] = value
        else:
            raise YamlConfigError(f"{where}keys are SECTION.KEY or KEY, not {key!r}")
    return out


def _all_keys() -> list[str]:
    return [*TRAINING_KEYS, *SECTIONS, *(k for s in SECTIONS for k in SCHEMA[s])]


def _check_known(where: str, section: str, key: str) -> None:
    if key not in SCHEMA[section]:
        raise _prefixed(where, _unknown_key(f"{section}.", key, SCHEMA[section]))


def _prefixed(prefix: str, err: YamlConfigError) -> YamlConfigError:
    return YamlConfigError(f"{prefix}{err}")


def _merge(base: dict, extra: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def load_run_config(path: str | Path, overrides: Sequence[str] = (), *,
                    instantiate_checks: bool = True) -> RunConfig:
    """Read a run YAML, apply ``overrides``, check every key and build the RunConfig.

    ``instantiate_checks=False`` validates "on paper": everything that depends on the config
    alone is checked (TransformerConfig's and DeepSeekMoE's own rules, the layout, the training
    settings), but not whether this machine can run it (Transformer Engine / FP8-capable GPU
    for ``fp8`` and ``moe_expert_backend: te``). Nothing is ever instantiated and no process
    group is needed in either mode.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise YamlConfigError(f"{path}: cannot read the run config ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise YamlConfigError(f"{path}: not valid YAML ({err})") from None
    return run_config_from_dict(raw if raw is not None else {}, overrides,
                                instantiate_checks=instantiate_checks, origin=str(path))


def run_config_from_dict(source: Mapping, overrides: Sequence[str] = (), *,
                         instantiate_checks: bool = True, origin: str = "<run config>"
                         ) -> RunConfig:
    """Same as load_run_config for a document already in memory (yaml_config's schema)."""
    if not isinstance(source, Mapping):
        raise YamlConfigError(f"{origin}: the document must be a mapping of sections and keys, "
                              f"got {_describe(source)}")
    merged = _merge(dict(source), parse_overrides(overrides)) if overrides else copy.deepcopy(
        dict(source))
    try:
        return _build(merged, instantiate_checks)
    except YamlConfigError as err:
        raise YamlConfigError(f"{origin}: {err}") from None


def _build(doc: dict, instantiate_checks: bool) -> RunConfig:
    sections: dict[str, dict] = {}
    train_values: dict = {}
    normalized: dict = {}  # the document with checked values (e.g. "1e-3" read as a number)
    for key, value in doc.items():
        if key in SECTIONS:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise YamlConfigError(f"{key}: expected a mapping of keys, got {_describe(value)}")
            checked = {}
            for sub_key, sub_value in value.items():
                if sub_key not in SCHEMA[key]:
                    raise _unknown_key(f"{key}.", sub_key, SCHEMA[key])
                checked[sub_key] = _check_value(f"{key}.{sub_key}", sub_value,
                                                SCHEMA[key][sub_key])
            sections[key] = checked
            normalized[key] = {k: _yaml_value(v) for k, v in checked.items()}
        elif key in _TRAIN_FIELDS:
            train_values[key] = _check_train_value(key, value)
            normalized[key] = _yaml_value(train_values[key])
        else:
            raise _unknown_key("", key, [*TRAINING_KEYS, *SECTIONS])
    lm = sections.get("language_model", {})
    mp = sections.get("model_parallel", {})
    dsm = sections.get("deepseekmoe", {})
    for key in _REQUIRED:
        if lm.get(key, 0) < 1:
            raise YamlConfigError(f"language_model.{key}: required (a positive integer)")
    for key, (value, why) in _FIXED_VALUES.items():
        if key in mp and mp[key] != value:
            raise YamlConfigError(f"model_parallel.{key}={mp[key]}: {why}")

    train = TrainingArgs(**train_values)
    if train.max_position_embeddings is None:
        train.max_position_embeddings = train.seq_length
    if train.vocab_size is None:
        from dsmoe_megatron.tokenizer import ByteTokenizer

        train.vocab_size = ByteTokenizer().vocab_size
    train.validate()

    _check_pipeline_split(lm, mp)
    kwargs = deepseek_defaults()
    kwargs.update(lm)
    kwargs.update(dsm)
    kwargs.update(mp)
    if kwargs.get("bf16") and kwargs.get("fp16"):
        raise YamlConfigError("model_parallel: bf16 and fp16 are both true; choose one")
    dtype = torch.bfloat16 if kwargs.get("bf16") else torch.float16 if kwargs.get("fp16") \
        else torch.float32
    kwargs["params_dtype"] = dtype
    kwargs["pipeline_dtype"] = dtype
    try:
        with _environment_checks(instantiate_checks):
            model = DeepSeekMoEConfig(**kwargs)
    except YamlConfigError:
        raise
    except (ValueError, AssertionError, TypeError, ZeroDivisionError) as err:
        raise YamlConfigError(f"invalid model configuration: {err}") from None

    etp = model.expert_tensor_parallel_size
    layout = ParallelLayout(
        tensor=model.tensor_model_parallel_size,
        pipeline=model.pipeline_model_parallel_size,
        expert=model.expert_model_parallel_size,
        # canonical: None when it equals the tensor size (ParallelLayout's "same as tensor")
        expert_tensor=None if etp in (None, model.tensor_model_parallel_size) else etp,
        virtual_pipeline=model.virtual_pipeline_model_parallel_size,
        sequence_parallel=model.sequence_parallel,
    )
    return RunConfig(model=model, layout=layout, train=train, source=normalized)


def _check_train_value(key: str, value):
    if key == "data_path":
        # A single prefix is accepted for a one-element blend; weights may be numbers.
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                     for v in value]
    if key == "split" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return _check_value(key, value, _TRAIN_HINTS[key])


def _check_pipeline_split(lm: dict, mp: dict) -> None:
    """Megatron splits layers evenly over the stages unless told otherwise; say so early."""
    pp = mp.get("pipeline_model_parallel_size", 1)
    vpp = mp.get("virtual_pipeline_model_parallel_size") or 1
    if vpp > 1 and pp == 1:
        raise YamlConfigError(
            "model_parallel.virtual_pipeline_model_parallel_size needs pipeline parallelism; "
            "set pipeline_model_parallel_size > 1 or virtual_pipeline_model_parallel_size: null")
    if any(mp.get(k) for k in _PIPELINE_SPLIT_FIELDS):
        return
    layers = lm["num_layers"]
    if layers % (pp * vpp):
        chunks = f"{pp} pipeline stages" + (f" x {vpp} virtual stages" if vpp > 1 else "")
        raise YamlConfigError(
            f"language_model.num_layers={layers} does not split evenly over {chunks}; change "
            "pipeline_model_parallel_size or set model_parallel.num_layers_in_first_pipeline_stage"
            " / num_layers_in_last_pipeline_stage (or account_for_embedding_in_pipeline_split / "
            "account_for_loss_in_pipeline_split)")


@contextmanager
def _environment_checks(enabled: bool):
    """Without instantiate checks, the machine-dependent checks report success: this plugin's
    (Transformer Engine importable, FP8-capable GPU) and TransformerConfig's Transformer Engine
    version requirements (e.g. MoE FP8 needs TE >= 1.7)."""
    if enabled:
        yield
        return
    from megatron.core.transformer import transformer_config as megatron_config

    patches = [(_config_module, n) for n in ("_te_available", "_gpu_supports_fp8")]
    patches.append((megatron_config, "is_te_min_version"))
    saved = [(owner, name, getattr(owner, name)) for owner, name in patches
             if hasattr(owner, name)]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, lambda *args, **kwargs: True)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def check_world_size(cfg: RunConfig, world_size: int) -> int:
    """Check that the layout and the batch sizes fit ``world_size`` ranks; returns the DP size."""
    if world_size < 1:
        raise YamlConfigError(f"world size must be >= 1 (got {world_size})")
    try:
        cfg.layout.check(world_size)
    except ValueError as err:
        raise YamlConfigError(str(err)) from None
    dp = cfg.layout.data_parallel_size(world_size)
    train = cfg.train
    if train.global_batch_size is not None and train.global_batch_size % (
            train.micro_batch_size * dp):
        raise YamlConfigError(
            f"global_batch_size={train.global_batch_size} is not divisible by micro_batch_size "
            f"({train.micro_batch_size}) x data-parallel size ({dp}, = world size {world_size} / "
            f"(tensor {cfg.layout.tensor} x pipeline {cfg.layout.pipeline})); choose a global "
            f"batch that is a multiple of {train.micro_batch_size * dp} or another world size")
    return dp


# ---------------------------------------------------------------------------------------------
# Writing


def _yaml_value(value):
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_yaml_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml_value(v) for k, v in value.items()}
    return value


def _current_values(cfg: RunConfig):
    """(section or None, key, value) for every schema key, read from the config objects."""
    for section in SECTIONS:
        for key in SCHEMA[section]:
            yield section, key, getattr(cfg.model, key)
    for key in TRAINING_KEYS:
        yield None, key, getattr(cfg.train, key)


def run_config_to_dict(cfg: RunConfig) -> dict:
    """The YAML document for ``cfg``: its ``source`` plus any value changed since loading.

    A RunConfig built without a source is written as every value that differs from the defaults.
    """
    doc = copy.deepcopy(cfg.source) if cfg.source else {}
    reference = None
    if cfg.source:
        try:
            reference = _build(copy.deepcopy(cfg.source), instantiate_checks=False)
        except YamlConfigError:
            reference = None
    ref_values = {(s, k): v for s, k, v in _current_values(reference)} if reference else None
    train_defaults = TrainingArgs()
    for section, key, value in _current_values(cfg):
        if ref_values is not None:
            ref = ref_values[(section, key)]
        elif section is None:
            ref = getattr(train_defaults, key)
        else:
            ref = _model_default(key)
        if _yaml_value(value) == _yaml_value(ref):
            continue
        if section is None:
            doc[key] = _yaml_value(value)
        else:
            if not isinstance(doc.get(section), dict):
                doc[section] = {}
            doc[section][key] = _yaml_value(value)
    return doc


def dump_run_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the run's YAML (atomically: a temporary file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = run_config_to_dict(cfg)
    ordered = {k: doc[k] for k in (*SECTIONS, *TRAINING_KEYS) if k in doc}
    ordered.update({k: v for k, v in doc.items() if k not in ordered})
    text = "# dsmoe_megatron run config (merged, overrides applied)\n" + yaml.safe_dump(
        ordered, sort_keys=False, default_flow_style=None)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
