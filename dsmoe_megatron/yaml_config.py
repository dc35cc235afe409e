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
valid name (types: ``yaml_values``), numbers outside their range or not finite likewise
(``field_ranges``), repeated keys and anchors with the line (``strict_yaml``).
``load_run_config(path, ["language_model.num_layers=4", "lr=1e-3"])`` applies ``key=value``
overrides (values parsed as YAML) before anything is checked.

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
import typing
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from megatron.core.model_parallel_config import ModelParallelConfig

from dsmoe_megatron import config as _config_module
from dsmoe_megatron import field_ranges, strict_yaml
from dsmoe_megatron.cli import default_file_mode
from dsmoe_megatron.config import ConfigError, DeepSeekMoEConfig, deepseek_defaults
from dsmoe_megatron.early_exit import EXIT_SIGNALS
from dsmoe_megatron.runtime import ParallelLayout
from dsmoe_megatron.tokenizer import ByteTokenizer
from dsmoe_megatron.yaml_values import Mismatch, convert, describe, yamlable

__all__ = [
    "LR_DECAY_STYLES",
    "RunConfig",
    "SECTIONS",
    "TrainingArgs",
    "YamlConfigError",
    "check_world_size",
    "dump_run_config",
    "load_run_config",
    "override_text",
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
    """A checkpoint (save directory or iter_ directory) a new run starts from: its weights,
    optimizer state and iteration, or with ``finetune`` its weights only."""
    finetune: bool = False
    """Start from ``load``'s weights at iteration 0, with a new optimizer, lr schedule and sample
    stream (Megatron-LM's name); the model must be the same, any layout or precision."""
    save_interval: int | None = None
    """None: save only at the end of training (when ``save`` is set)."""
    keep_checkpoints: int | None = None
    """Keep the newest this many checkpoints in ``save``: each save deletes the older ones (a
    145B checkpoint with its optimizer state takes about 2 TB). None: keep every one."""
    exit_duration_in_mins: float | None = None
    """Save and stop once the run has taken this long (from its start, setup included): a job's
    time limit less what a step and a save take. None: no limit (Megatron-LM's name)."""
    exit_signal_handler: bool = False
    """On ``exit_signal``, save after the current step and stop (Megatron-LM's name); off, SIGTERM
    stops at once and the steps since the last save are lost."""
    exit_signal: str = "SIGTERM"
    """SIGTERM, SIGUSR1, SIGUSR2 or SIGHUP (what the scheduler sends before it kills the job)."""
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
        """Each value in its range (field_ranges), then the relations between them."""
        def bad(key, msg):
            raise YamlConfigError(f"{key}: {msg}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = field_ranges.problem(f.name, value)
            if problem:
                raise YamlConfigError(f"{f.name}={value!r}: {problem}")
        if self.global_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            bad("global_batch_size",
                f"{self.global_batch_size} must be a positive multiple of micro_batch_size "
                f"({self.micro_batch_size})")
        max_pos = self.max_position_embeddings
        if max_pos is not None and max_pos < self.seq_length:
            bad("max_position_embeddings",
                f"{self.max_position_embeddings} is smaller than seq_length ({self.seq_length})")
        tokenizer_vocab = ByteTokenizer().vocab_size
        if self.vocab_size is not None and self.vocab_size < tokenizer_vocab:
            bad("vocab_size",
                f"{self.vocab_size} is smaller than the byte-level tokenizer's {tokenizer_vocab} "
                "ids (256 bytes + 3 special tokens), so tokens would index past the embedding; "
                f"set vocab_size >= {tokenizer_vocab} or null")
        if self.min_lr > self.lr:
            bad("min_lr", f"must be between 0 and lr={self.lr} (got {self.min_lr})")
        if self.lr_warmup_iters > self.train_iters:
            bad("lr_warmup_iters",
                f"must be between 0 and train_iters={self.train_iters} "
                f"(got {self.lr_warmup_iters})")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            near = difflib.get_close_matches(self.lr_decay_style, LR_DECAY_STYLES, n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            bad("lr_decay_style",
                f"{self.lr_decay_style!r} is not one of {', '.join(LR_DECAY_STYLES)}{hint}")
        points = list(self.lr_step_decay_at)
        if points != sorted(set(points)):
            bad("lr_step_decay_at",
                f"{points} must be increasing fractions of train_iters, each between 0 and 1")
        if self.exit_signal not in EXIT_SIGNALS:
            bad("exit_signal", f"{self.exit_signal!r} is not one of {', '.join(EXIT_SIGNALS)}")
        if self.finetune and self.load is None:
            bad("finetune", "true needs load: the checkpoint whose weights the run starts from")
        self._validate_evaluation()
        self._validate_data_path()
        for key in ("save", "load", "tensorboard_dir"):
            if getattr(self, key) == "":
                bad(key, "is an empty path; give a directory or null")

    def _validate_evaluation(self) -> None:
        shares = split_shares(self.split)
        if shares is None:
            raise YamlConfigError(f"split: {self.split!r} must be up to three non-negative "
                                  "weights such as '969,30,1' (train,valid,test)")
        train, valid, _ = shares
        if train <= 0:
            raise YamlConfigError(f"split: {self.split!r} gives training no share; the first "
                                  "weight (train) must be > 0, e.g. '969,30,1'")
        if not self.eval_interval:
            return
        if self.eval_iters == 0:
            raise YamlConfigError(
                f"eval_iters: 0 evaluates nothing, but eval_interval={self.eval_interval} asks "
                "for evaluation; set eval_interval: null to turn evaluation off, or eval_iters "
                ">= 1")
        if valid <= 0:
            raise YamlConfigError(
                f"split: {self.split!r} has no validation share, but eval_interval="
                f"{self.eval_interval} asks for evaluation; give the second weight (valid) a "
                "share, e.g. '969,30,1', or set eval_interval: null")

    def _validate_data_path(self) -> None:
        blend = self.data_path
        if blend is None:
            return
        if not blend:
            raise YamlConfigError("data_path: is an empty list; use null for the shipped corpus")
        for item in blend:  # Megatron-LM's --data-path form: "0.7 a 0.3 b" is one string here
            words = item.split()
            # A dataset or text file (data.py names the prefix to make of it) is one path.
            if len(words) > 1 and not (os.path.exists(f"{item}.idx") or os.path.isfile(item)):
                raise YamlConfigError(
                    f"data_path: {item!r} is one prefix with spaces, not a blend; list its "
                    f"parts: data_path=[{', '.join(w for i in blend for w in i.split())}]")
        if not any(map(_is_number, blend)):  # [a, 0.7, b] lacks a weight, not a dataset 0.7
            return
        if len(blend) % 2 or not all(_is_number(w) for w in blend[::2]):
            raise YamlConfigError(f"data_path: {blend} looks like a weighted blend but is not "
                                  "'weight, prefix' pairs")
        for weight, prefix in zip(blend[::2], blend[1::2]):
            if not (math.isfinite(float(weight)) and float(weight) > 0):
                raise YamlConfigError(
                    f"data_path: the weight {weight} of {prefix} must be a positive finite "
                    "number (weights are normalised to sum to 1); drop the entry to leave it out")


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


def _build_schema() -> dict[str, dict[str, Any]]:
    lm, mp, dsm = {}, {}, {}
    for name in _MODEL_FIELDS:
        tp = _MODEL_HINTS.get(name, Any)
        if name.startswith("_") or name in NOT_CONFIGURABLE or not yamlable(tp):
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
# Values: types and ranges, with readable errors


def _check_value(where: str, value, tp):
    """``value`` converted to annotation ``tp`` and in its field's range (field_ranges)."""
    try:
        value = convert(value, tp)
    except Mismatch as err:
        raise YamlConfigError(f"{where}: {err}") from None
    problem = field_ranges.problem(where.rpartition(".")[2], value)
    if problem:
        raise YamlConfigError(f"{where}={value!r}: {problem}")
    return value


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
    YAML (``null``, ``[1, 2]``, ``true``...). ``section={...}`` sets several keys.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out: dict = {}
    for item in overrides:
        key, equals, text = item.partition("=") if isinstance(item, str) else ("", "", "")
        key = key.strip()
        if not equals or not key:
            raise YamlConfigError(f"override {item!r}: expected key=value (e.g. lr=1e-3 or "
                                  "language_model.num_layers=4)")
        if not text.strip():
            # An unset shell variable (save=$SAVE) must not become null and silently save nothing.
            raise YamlConfigError(f"override {item!r}: no value; write {key}=null to unset it")
        try:
            value = strict_yaml.load(text)
        except strict_yaml.YamlSyntaxError as err:
            raise YamlConfigError(f"override {item!r}: the value: {err}") from None
        comment = strict_yaml.comment_start(text)
        if comment is not None:
            # save=/runs/job #2 would otherwise mean /runs/job: another run's directory.
            raise YamlConfigError(
                f"override {item!r}: YAML reads ' #' and what follows as a comment, so the value "
                f"would be {text[:comment].strip()!r}; quote the value ({key}='\"...\"') if the "
                "# belongs to it")
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
                    _check_override(where, f"{name}.{sub_key}", sub_value)
                    out.setdefault(name, {})[sub_key] = sub_value
                continue
            if name in _TRAIN_FIELDS:
                _check_override(where, name, value)
                out[name] = value
                continue
            owners = [s for s in SECTIONS if name in SCHEMA[s]]
            if len(owners) > 1:
                raise YamlConfigError(f"{where}{name} exists in {' and '.join(owners)}; write "
                                      f"SECTION.{name}=...")
            if not owners:
                raise _prefixed(where, _unknown_key("", name, _all_keys()))
            _check_override(where, f"{owners[0]}.{name}", value)
            out.setdefault(owners[0], {})[name] = value
        elif len(parts) == 2:
            section, name = parts
            if section not in SECTIONS:
                near = difflib.get_close_matches(section, SECTIONS, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]}?" if near else ""
                raise YamlConfigError(f"{where}{section}: unknown section (sections: "
                                      f"{', '.join(SECTIONS)}){hint}")
            _check_known(where, section, name)
            _check_override(where, key, value)
            out.setdefault(section, {})[name] = value
        else:
            raise YamlConfigError(f"{where}keys are SECTION.KEY or KEY, not {key!r}")
    return out


def override_text(value) -> str:
    """``value`` as a key=value override spells it (None: null, True: true)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def _all_keys() -> list[str]:
    return [*TRAINING_KEYS, *SECTIONS, *(k for s in SECTIONS for k in SCHEMA[s])]


def _check_known(where: str, section: str, key: str) -> None:
    if key not in SCHEMA[section]:
        raise _prefixed(where, _unknown_key(f"{section}.", key, SCHEMA[section]))


def _check_override(where: str, key: str, value) -> None:
    """The value's type and range, so that an error names the override, not the file."""
    section, _, name = key.rpartition(".")
    try:
        if section:
            _check_value(key, value, SCHEMA[section][name])
        else:
            _check_train_value(name, value)
    except YamlConfigError as err:
        raise _OverrideValueError(f"{where}{err}") from None


class _OverrideValueError(YamlConfigError):
    """A value an override gives that its key does not take (reported with the file too)."""


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
    settings), but not whether this machine can run it (Transformer Engine / a GPU for the
    ``fp8`` / ``fp4`` recipe and ``moe_expert_backend: te``; ``save`` and ``tensorboard_dir``
    writable, ``load`` present). Nothing is ever instantiated or created and no process group
    is needed in either mode.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise YamlConfigError(f"{path}: cannot read the run config ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise YamlConfigError(f"{path}: not a YAML text file (byte {err.start + 1} is not UTF-8); "
                              "give the path of a run config YAML, such as "
                              "yaml_configs/tiny.yaml") from None
    try:
        raw = strict_yaml.load(text)
    except strict_yaml.YamlSyntaxError as err:
        raise YamlConfigError(f"{path}: {err}") from None
    return run_config_from_dict(raw if raw is not None else {}, overrides,
                                instantiate_checks=instantiate_checks, origin=str(path))


def run_config_from_dict(source: Mapping, overrides: Sequence[str] = (), *,
                         instantiate_checks: bool = True, origin: str = "<run config>"
                         ) -> RunConfig:
    """Same as load_run_config for a document already in memory (yaml_config's schema)."""
    if not isinstance(source, Mapping):
        raise YamlConfigError(f"{origin}: the document must be a mapping of sections and keys, "
                              f"got {describe(source)}")
    try:
        extra = parse_overrides(overrides) if overrides else {}
    except _OverrideValueError as err:
        raise YamlConfigError(f"{origin}: {err}") from None
    if (isinstance(extra.get("save"), str) and "tensorboard_dir" not in extra
            and source.get("tensorboard_dir") is not None):
        # Another save directory is another run: its TensorBoard logs go with it, not into the
        # file's tensorboard_dir beside another run's.
        extra["tensorboard_dir"] = os.path.join(extra["save"], "tensorboard")
    merged = _merge(dict(source), extra)
    try:
        return _build(merged, instantiate_checks)
    except YamlConfigError as err:
        # The error may be the file's value against an override's (lr_warmup_iters: 20 of the
        # file with train_iters=10): name both places, unless it quotes the override already.
        unnamed = [o for o in overrides if f"{o}: " not in str(err)]
        given = f" with {' '.join(unnamed)}" if unnamed else ""
        raise YamlConfigError(f"{origin}{given}: {err}") from None


def _build(doc: dict, instantiate_checks: bool) -> RunConfig:
    sections: dict[str, dict] = {}
    train_values: dict = {}
    normalized: dict = {}  # the document with checked values (e.g. "1e-3" read as a number)
    for key, value in doc.items():
        if key in SECTIONS:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise YamlConfigError(f"{key}: expected a mapping of keys, got {describe(value)}")
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
        if key not in lm:
            raise YamlConfigError(f"language_model.{key}: required (a positive integer)")

    train = TrainingArgs(**train_values)
    if train.max_position_embeddings is None:
        train.max_position_embeddings = train.seq_length
    if train.vocab_size is None:
        train.vocab_size = ByteTokenizer().vocab_size
    train.validate()
    if instantiate_checks:
        _check_paths(train)

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
        _config_module.check_rope_head_dim(model)
    except YamlConfigError:
        raise
    except (ValueError, AssertionError, TypeError, ZeroDivisionError) as err:
        raise YamlConfigError(f"invalid model configuration: {err}") from None

    tp = model.tensor_model_parallel_size
    if model.sequence_parallel and train.seq_length % tp:
        # Megatron asserts it in the first forward, a traceback on every rank.
        raise YamlConfigError(
            f"seq_length={train.seq_length} is not divisible by tensor_model_parallel_size={tp}, "
            "over which model_parallel.sequence_parallel splits each sequence; choose a "
            f"seq_length that is a multiple of {tp} or set sequence_parallel: false")
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
    # No shell reads a YAML file: "~/runs/x" would otherwise make a directory named "~".
    if key in ("save", "load", "tensorboard_dir") and isinstance(value, str):
        value = os.path.expanduser(value)
    if key == "data_path":
        # A single prefix is accepted for a one-element blend; weights may be numbers.
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else os.path.expanduser(v) if isinstance(v, str) else v for v in value]
    if key == "split" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return _check_value(key, value, _TRAIN_HINTS[key])


def split_shares(text: str) -> tuple[float, float, float] | None:
    """The (train, valid, test) weights of Megatron's ``--split`` text, up to three (the missing
    ones 0); None if ``text`` is not such weights."""
    if not re.fullmatch(r"\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*", text):
        return None
    return (*(float(w) for w in text.split(",")), 0.0, 0.0)[:3]


def _check_paths(train: TrainingArgs) -> None:
    """The output directories can be created and written, the checkpoint to load exists, no
    dataset is listed twice. Nothing is created here: a run config is only read."""
    _refuse_repeated_datasets(train.data_path or [])
    for key in ("save", "tensorboard_dir"):
        path = getattr(train, key)
        problem = output_dir_problem(path) if path is not None else None
        if problem:
            raise YamlConfigError(f"{key}={path}: {problem}; choose another directory for {key}")
    if train.load is not None and not os.path.isdir(train.load):
        what = "is a file, not" if os.path.exists(train.load) else "does not exist; expected"
        raise YamlConfigError(
            f"load={train.load}: {what} a checkpoint directory (the save directory of an earlier "
            "run); correct the path or set load: null")


def _refuse_repeated_datasets(blend: list[str]) -> None:
    """A dataset listed twice is most likely a typo for another one. Checked for a run about to
    start, not in the run.yaml of a checkpoint, which earlier versions wrote with such blends."""
    weighted = any(map(_is_number, blend))
    seen: dict[str, str] = {}
    for prefix in blend[1::2] if weighted else blend:
        first = seen.get(os.path.normpath(prefix))
        seen[os.path.normpath(prefix)] = prefix
        if first is not None:
            also = f" (also as {first})" if first != prefix else ""
            raise YamlConfigError(
                f"data_path: {prefix} is given twice{also}; list each dataset once"
                + (", with the sum of its weights" if weighted else
                   " (to weight datasets, give weights: [0.7, a, 0.3, b])"))


def output_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot be (or be created as) a writable directory; None if it can."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a directory"
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest existing ancestor, where mkdir starts
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, so no directory can be created under it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _check_pipeline_split(lm: dict, mp: dict) -> None:
    """Megatron splits layers evenly over the stages unless told otherwise; say so early."""
    pp = mp.get("pipeline_model_parallel_size", 1)
    vpp = mp.get("virtual_pipeline_model_parallel_size") or 1
    if vpp > 1 and pp == 1:
        raise YamlConfigError(
            "model_parallel.virtual_pipeline_model_parallel_size needs pipeline parallelism; "
            "set pipeline_model_parallel_size > 1 or virtual_pipeline_model_parallel_size: null")
    chunks = f"{pp} pipeline stages" + (f" x {vpp} virtual stages" if vpp > 1 else "")
    layers = lm["num_layers"]
    counted = [k for k in ("account_for_embedding_in_pipeline_split",
                           "account_for_loss_in_pipeline_split") if mp.get(k)]
    if counted and not any(mp.get(k) for k in _PIPELINE_SPLIT_FIELDS if k not in counted):
        # Megatron counts the embedding and the loss as a layer each; its own message ("number
        # of middle layers: 5 must be divisible by ...") names no field.
        total = layers + len(counted)
        if total % (pp * vpp):
            raise YamlConfigError(
                f"language_model.num_layers={layers} + {len(counted)} for model_parallel."
                f"{' / '.join(counted)} = {total} does not split evenly over {chunks}; choose "
                f"num_layers so that num_layers + {len(counted)} is a multiple of {pp * vpp}, "
                "change pipeline_model_parallel_size, or set those fields to false")
        return
    if any(mp.get(k) for k in _PIPELINE_SPLIT_FIELDS):
        return
    if layers % (pp * vpp):
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

    patches = [(_config_module, n) for n in ("_te_available", "_gpu_supports")]
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
        cfg.layout.check(world_size, cfg.model.num_moe_experts)
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
    vpp, pp = cfg.model.virtual_pipeline_model_parallel_size, cfg.layout.pipeline
    group = cfg.model.microbatch_group_size_per_vp_stage or pp
    micro = train.num_microbatches(dp)
    if vpp and (not pp <= group <= micro or 0 < micro % group < pp):
        # Megatron's interleaved schedule refuses it in the first step (a traceback per rank)
        raise YamlConfigError(
            f"virtual_pipeline_model_parallel_size={vpp}: the interleaved schedule runs the "
            f"{micro} micro-batches per step (global batch {train.global_batch(dp)} / "
            f"(micro_batch_size {train.micro_batch_size} x data-parallel size {dp})) in groups "
            f"of {group} (microbatch_group_size_per_vp_stage, default the pipeline size) and "
            f"needs at least {group} and a last group of 0 or >= {pp}; choose a global batch "
            f"that makes them a multiple of {group}, or virtual_pipeline_model_parallel_size: "
            "null")
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
    text = "# dsmoe_megatron run config (merged, overrides applied)\n" + strict_yaml.dump(
        ordered)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            default_file_mode(f.fileno())
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
