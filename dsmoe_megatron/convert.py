"""Megatron dist checkpoint <-> Hugging Face (deepseek-moe-16b-base layout) conversion.

    dsmoe-convert to-hf   --checkpoint SAVE_OR_ITER_DIR --out HF_DIR [--dtype auto|bf16|fp16|fp32]
    dsmoe-convert from-hf --hf HF_DIR --out SAVE_DIR [--tensor-model-parallel-size N ...]

Both directions stream: memory stays near one layer (plus one output safetensors shard), whatever
the model size. to-hf reads a checkpoint saved under any TP/PP/EP layout one tensor at a time at
its global shape (dist-checkpoint keys are layout independent), takes the model from the
checkpoint's run.yaml, and writes config.json (every field explicit), generation_config.json,
sharded safetensors + index, the remote-code files and the tokenizer files (see
``choose_tokenizer``); it refuses NaN/inf weights unless told otherwise. from-hf reads
config.json and the safetensors (never pickles) tensor by tensor, and writes a save directory:
an iteration-0 dist checkpoint with its run.yaml, which the trainer loads on any layout. Both
write ``<out>.partial`` and rename it when complete (``--force`` renames the earlier output
aside first, and deletes it last).

The tensor and config mapping is in ``dsmoe_megatron.hf.mapping``, the streaming readers and
writers in ``dsmoe_megatron.hf.streaming``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from dsmoe_megatron.cli import (describe_os_error, find_cause, positive_int, quiet_warnings,
                                quiet_when_run_as_main)

quiet_when_run_as_main(__name__)

import torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

from dsmoe_megatron.hf.mapping import (  # noqa: E402
    DTYPE_NAMES,
    DTYPES,
    IGNORED_HF_TENSORS,
    ConversionError,
    Dims,
    canonical_name,
    check_exportable,
    check_megatron_tensors,
    check_shapes,
    hf_config_dict,
    hf_defaults,
    json_type,
    hf_dims,
    hf_expected_shapes,
    hf_to_megatron,
    log,
    megatron_to_hf,
    model_fields_from_hf,
    normalise_megatron_names,
    single_rank_config,
)
from dsmoe_megatron.hf.streaming import (  # noqa: E402
    DistCheckpointReader,
    SafetensorsReader,
    StreamingSaveStrategy,
    check_fits,
    write_safetensors_shards,
)

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
# chat_template.jinja: where transformers >= 4.50 saves a chat template (not in
# tokenizer_config.json); added_tokens.json: a slow tokenizer's added tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


# ------------------------------------------------------------------------------------------
# Runtime, run configs, output directories
# ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def single_rank_runtime() -> Iterator[None]:
    """A single-process runtime for the duration (reusing one that is already up)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from dsmoe_megatron import runtime

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                "the converter runs as a single process; it was called inside a "
                f"{dist.get_world_size()}-process job (run dsmoe-convert without torchrun)")
        sizes_one = parallel_state.model_parallel_is_initialized() and all(
            f() == 1 for f in (parallel_state.get_tensor_model_parallel_world_size,
                               parallel_state.get_pipeline_model_parallel_world_size,
                               parallel_state.get_expert_model_parallel_world_size))
        if not sizes_one:
            runtime.initialize(runtime.ParallelLayout())
        yield
        return
    if os.environ.get("WORLD_SIZE", "1").strip() != "1":  # also one left over in a shell
        raise ConversionError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: this tool runs as a single process (run "
            "it without torchrun, and unset WORLD_SIZE if it is left over in the shell)")
    saved = {k: os.environ.get(k) for k in ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        # A MASTER_PORT inherited from a parent that holds it would make the rendezvous fail;
        # without one the runtime uses an in-memory store.
        os.environ.pop("MASTER_PORT", None)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    try:
        runtime.initialize(runtime.ParallelLayout())
        try:
            yield
        finally:
            runtime.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _yaml_config():
    try:
        from dsmoe_megatron import yaml_config
    except ImportError as err:  # pragma: no cover - only while the package is incomplete
        raise ConversionError(f"dsmoe_megatron.yaml_config is not importable: {err}") from err
    return yaml_config


@contextlib.contextmanager
def _atomic_output(out_dir: str | Path, force: bool, source: Path) -> Iterator[tuple[Path, Path]]:
    """Yields (out, partial): write into ``<out>.partial``, which replaces ``out`` when the block
    completes and is removed if it fails, so ``out`` is never half-written. A replaced ``out``
    is renamed aside first and deleted last, so a kill in between loses nothing: the next run
    puts it back (or deletes it, if the new output had already taken its place)."""
    out = Path(out_dir)
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ConversionError(f"--out {out} contains the input {source}; choose a separate "
                              "output directory")
    cwd = Path.cwd().resolve()
    if dst == cwd or dst in cwd.parents:
        # The output is a new directory renamed into place: the shell would be left in the old one.
        raise ConversionError(f"--out {out} is {'' if dst == cwd else 'above '}the current "
                              "directory, which the output would replace; name a new directory "
                              "(e.g. --out hf_model) or run from another directory")
    aside = out.with_name(out.name + ".replaced-by-dsmoe-convert")
    _settle_aside(out, aside)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file, not a directory; choose another --out "
                              "(--force replaces only a directory)")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConversionError(
                f"output directory {out} exists and is not empty; choose another --out or pass "
                "--force to replace it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield out, partial
        if out.exists():
            os.replace(out, aside)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        _settle_aside(out, aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)  # what is left, the next run into --out removes


def _settle_aside(out: Path, aside: Path) -> None:
    """``aside``, the earlier ``out`` of a replacing run that stopped between its renames: put
    back where no new ``out`` took its place, else deleted."""
    if not aside.is_dir():
        return
    if out.exists():
        shutil.rmtree(aside)
        log(f"removed {aside}: the earlier output, already replaced by an interrupted run")
    else:
        os.replace(aside, out)
        log(f"restored {out} from {aside}, where an interrupted run had moved it")


def _resolve_checkpoint(path: str | Path) -> Path:
    from dsmoe_megatron import checkpoint

    try:
        return checkpoint.resolve(path)
    except checkpoint.CheckpointError as err:
        raise ConversionError(str(err)) from err


def parse_size(text: str | int) -> int:
    """'5GB', '200MB', '1GiB', '4096' -> bytes (at least 1)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", str(text).upper())
        if not m:
            raise ConversionError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 1048576")
        if (m.group(2) or "") not in units:
            raise ConversionError(f"unknown size unit in {text!r}")
        size = int(float(m.group(1)) * units[m.group(2) or ""])
    if size < 1:
        raise ConversionError(f"--max-shard-size {text!r} must be at least 1 byte; write e.g. 5GB")
    return size


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------

HF_SOURCE_DIR = "hf_source"
"""from-hf keeps the source's config.json and tokenizer files here, next to ``latest``."""

_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass
class TokenizerExport:
    """Which tokenizer files go with an export and the special-token ids for config.json."""

    source: str  # "byte", a directory, or "none"
    token_ids: dict
    directory: Path | None = None

    def write(self, out: Path, model_max_length: int) -> list[str]:
        """Writes the files into ``out``; the byte tokenizer's with the model's context length
        (copied files are left as they are)."""
        if self.source == "byte":
            try:
                from dsmoe_megatron.tokenizer import write_hf_tokenizer
            except ImportError:
                log("no tokenizer-file writer available; tokenizer files skipped")
                return []
            try:
                write_hf_tokenizer(out, model_max_length=model_max_length)
            except ImportError as err:
                log(f"tokenizer files skipped: {err}")
                return []
            return [f for f in TOKENIZER_FILES if (out / f).exists()]
        if self.directory is not None:
            copied = tokenizer_files(self.directory)
            for name in copied:
                shutil.copyfile(self.directory / name, out / name)
            return copied
        return []


def tokenizer_files(directory: Path, fix: str = "replace it with a complete copy, or pass "
                    "--no-tokenizer to convert without the tokenizer files") -> list[str]:
    """The tokenizer files in ``directory``; one of JSON that does not parse (a truncated copy,
    which AutoTokenizer would fail on) raises ConversionError, which says ``fix``."""
    names = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
    for name in names:
        if name.endswith(".json"):
            read_json(directory / name, fix, "tokenizer file ")
    return names


def read_json(path: Path, fix: str, what: str = "", holding: str = "") -> dict:
    """The JSON object in ``path`` (every Hugging Face JSON file holds one; ``holding`` says of
    what)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{what}{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{what}{path} must hold a JSON object{holding}, not "
                              f"{json_type(data)}; {fix}")
    return data


def _token_ids_from(directory: Path) -> dict:
    ids = {}
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            data = read_json(path, "replace it with a complete copy")
            for key in _TOKEN_ID_KEYS:
                if key not in ids and data.get(key) is not None:
                    ids[key] = data[key]
    return ids


def kept_source(ckpt: Path, vocab_size: int) -> Path | None:
    """The directory where from-hf kept the source's files for this checkpoint, if its
    vocabulary is the run's; for a run started from another checkpoint (``load:``: a from-hf
    import fine-tuned into a new save directory), the one of the checkpoint it started from."""
    from dsmoe_megatron import checkpoint

    seen = set()
    while ckpt.resolve() not in seen:
        seen.add(ckpt.resolve())
        for directory in (ckpt.parent / HF_SOURCE_DIR, ckpt / HF_SOURCE_DIR):
            config = directory / "config.json"
            if config.is_file() and read_json(config, "replace it with a complete copy").get(
                    "vocab_size") == vocab_size:
                return directory
        try:
            run = checkpoint.saved_run_config(ckpt)
            if run is None or not run.train.load:
                return None
            ckpt = checkpoint.resolve(run.train.load)
        except checkpoint.CheckpointError:  # gone or moved since: no source to follow
            return None
    return None


def byte_corpus_mismatch(directory: Path | None, vocab_size: int | None, reads: str,
                         model: str, fix: str) -> str | None:
    """Why ``model``, whose Hugging Face files are in ``directory``, may not read the corpus
    shipped with dsmoe_megatron (``reads`` says what would): it has a tokenizer of its own, to
    which the corpus's byte-tokenizer ids are other tokens. None when it has none, or when its
    vocabulary is the byte tokenizer's (an export of a model trained here)."""
    from dsmoe_megatron.tokenizer import ByteTokenizer

    if directory is None or vocab_size in (None, ByteTokenizer().vocab_size):
        return None
    files = tokenizer_files(directory,
                            "replace it with a complete copy of the model's original file")
    if not files:
        return None
    return (f"{reads} the corpus shipped with dsmoe_megatron in the byte tokenizer's ids, but "
            f"{model} has a tokenizer of its own ({', '.join(files)} in {directory}), for which "
            "those ids are other tokens; tokenize your text with it (dsmoe-preprocess "
            f"--tokenizer {directory} --input FILE ... --output-prefix PREFIX) and {fix}")


def generation_defaults(kept: Path | None) -> dict:
    """generation_config.json without its special-token ids (the tokenizer's go in): the one of
    the source from-hf ``kept``, so that a chat model's sampling settings (do_sample,
    temperature...) survive the round trip, else transformers' marker of a config derived from
    the model's."""
    path = kept / "generation_config.json" if kept is not None else None
    if path is None or not path.is_file():
        return {"_from_model_config": True}
    data = read_json(path, "replace it with a complete copy")
    return {k: v for k, v in data.items() if k not in _TOKEN_ID_KEYS}


def choose_tokenizer(kept: Path | None, vocab_size: int,
                     tokenizer_dir: str | Path | None = None) -> TokenizerExport:
    """The run's tokenizer: an explicit directory of HF tokenizer files, else the files from-hf
    ``kept`` (``kept_source``), else the byte tokenizer when the
    vocabulary is its size; otherwise none (config.json then has the special-token ids of the
    kept source's config, if any)."""
    if tokenizer_dir is not None:
        directory = Path(tokenizer_dir)
        if not directory.is_dir():
            raise ConversionError(f"tokenizer directory {directory} does not exist (--tokenizer)")
        if not tokenizer_files(directory):
            raise ConversionError(
                f"tokenizer directory {directory} holds none of {', '.join(TOKENIZER_FILES)} "
                "(--tokenizer); pass the directory that has them, or --no-tokenizer")
        return TokenizerExport(str(directory), _token_ids_from(directory), directory)
    source = None
    if kept is not None:
        source = TokenizerExport(str(kept), _token_ids_from(kept), kept)
        if tokenizer_files(kept):
            return source
        # a source without tokenizer files: its special-token ids, unless byte's fit
    try:
        from dsmoe_megatron.tokenizer import ByteTokenizer
    except ImportError:
        ByteTokenizer = None
    if ByteTokenizer is not None and ByteTokenizer().vocab_size == vocab_size:
        tok = ByteTokenizer()
        return TokenizerExport("byte", dict(bos_token_id=tok.bos, eos_token_id=tok.eod,
                                            pad_token_id=tok.pad))
    log(f"vocabulary {vocab_size} is not the byte tokenizer's and no tokenizer files are known; "
        "pass --tokenizer DIR to include them")
    return source or TokenizerExport("none", {})


# ------------------------------------------------------------------------------------------
# to-hf
# ------------------------------------------------------------------------------------------

def read_checkpoint_run(ckpt: Path, config: str | Path | None = None,
                        overrides: Iterable[str] = ()):
    """The RunConfig saved with a checkpoint, or for one without (written by Megatron-LM's
    training loop) the ``config`` YAML; ``overrides`` apply to either (machine checks off: the
    converter runs on CPU). Where the checkpoint has its run.yaml, ``config`` and ``overrides``
    may change settings (max_position_embeddings...) but not the model it was trained as; where
    it has Megatron-LM's arguments instead, its context length is theirs unless ``overrides``
    set it."""
    from dsmoe_megatron import checkpoint

    run_yaml = ckpt / checkpoint.RUN_CONFIG_NAME
    if config is None and not run_yaml.exists():
        raise ConversionError(
            f"{run_yaml} is missing; the checkpoint does not say its model (a checkpoint of "
            "Megatron-LM's training loop?): pass the --dsmoe-yaml file it was trained with as "
            "--config, and each model flag given beside it as --set KEY=VALUE")
    overrides = tuple(overrides)
    try:  # a damaged run.yaml: named, with how to use an earlier checkpoint
        saved = checkpoint.saved_run_config(ckpt)
    except checkpoint.CheckpointError as err:
        raise ConversionError(str(err)) from None
    if saved is not None and config is None and not overrides:
        return saved
    run = _load_run_config(config or run_yaml, overrides)
    if saved is not None:
        given = " ".join([*(["--config", str(config)] if config is not None else []),
                          *(f"--set {o}" for o in overrides)])
        _check_same_model(run, saved, given, run_yaml)
    else:
        trained_with = _check_megatron_lm_arguments(run, ckpt)
        # The context length it was trained with, as a run.yaml gives it: the YAML's went into
        # config.json (tiny.yaml's 128 for a run of --seq-length 64) without a word.
        given = _keys_set(overrides)
        for key in ("seq_length", "max_position_embeddings"):
            if trained_with.get(key) is not None and key not in given:
                setattr(run.train, key, trained_with[key])
        positions, length = run.train.max_position_embeddings, run.train.seq_length
        if "seq_length" not in given and positions < length:  # exported as the longer, silently
            raise ConversionError(
                f"{ckpt} was trained with seq_length={length} (the Megatron-LM arguments it "
                f"keeps), but --set gives max_position_embeddings={positions}, fewer positions: "
                f"give at least {length}, or --set seq_length too")
    return run


# Megatron-LM arguments (with the value that means "off") of models the export cannot write.
_NOT_EXPORTED_ARGS = {"window_size": None, "softmax_type": "vanilla",
                      "experimental_attention_variant": None, "use_mup": False}


def _keys_set(overrides: Iterable[str]) -> set[str]:
    """The keys ``key=value`` overrides set."""
    return {o.partition("=")[0].strip() for o in overrides}


def _check_megatron_lm_arguments(run, ckpt: Path) -> dict:
    """A checkpoint of Megatron-LM's loop keeps the arguments it was trained with: --config and
    --set must give its model. A flag given beside --dsmoe-yaml and left out of --set (another
    top-k, say) was exported as the YAML's value, a different model, without a word. Returns
    those arguments ({} where the checkpoint has none)."""
    from megatron.core import dist_checkpointing

    from dsmoe_megatron.megatron_lm import _ARG_NAMES, other_rope_flags
    from dsmoe_megatron.checkpoint import SAME_MODEL_FIELDS

    try:
        saved = dist_checkpointing.load_common_state_dict(str(ckpt)).get("args")
    except Exception:  # noqa: BLE001 - reading the tensors next reports a damaged checkpoint
        return {}
    trained_with = dict(vars(saved)) if saved is not None else {}
    # Settings without tensors that Megatron-LM's loop trains with and a --dsmoe-yaml file does
    # not give: the export (another RoPE, attention) was another model without a word.
    not_exported = [*(other_rope_flags(saved) if saved is not None else []),
                    *(f"--{key.replace('_', '-')} {trained_with[key]}"
                      for key, off in _NOT_EXPORTED_ARGS.items()
                      if trained_with.get(key, off) != off)]
    if not_exported:
        raise ConversionError(
            f"{ckpt} was trained with {not_exported[0]} (the Megatron-LM arguments it keeps), "
            "which the Hugging Face model does not have (RoPE on the whole head, unscaled; "
            "softmax attention over every earlier token): the export would be another model, "
            "so only a run without it can be exported")
    if not trained_with.get("group_query_attention", True):
        # Without --group-query-attention Megatron-LM builds every head its own key/value and
        # leaves num_query_groups at 1 until its first FLOP count (a checkpoint saved before
        # any step, e.g. by --ckpt-convert-format, keeps that 1).
        trained_with["num_query_groups"] = trained_with.get("num_attention_heads")
    width, expert_width = (trained_with.get("moe_shared_expert_intermediate_size"),
                           trained_with.get("moe_ffn_hidden_size"))
    if trained_with.get("moe_num_shared_experts") is None and width and expert_width:
        # Without --moe-num-shared-experts the count is the shared width over the expert width.
        trained_with["moe_num_shared_experts"] = width // expert_width
    pairs = [(key, trained_with.get(_ARG_NAMES.get(key, key)), getattr(run.model, key))
             for key in SAME_MODEL_FIELDS]
    pairs.append(("vocab_size", trained_with.get("vocab_size"), run.train.vocab_size))
    for key, trained, given in pairs:
        if trained is not None and given is not None and trained != given:
            raise ConversionError(
                f"{ckpt} was trained with {key}={trained!r} (the Megatron-LM arguments it "
                f"keeps), but --config and --set give {given!r}: use --set {key}={trained}")
    return trained_with


def _load_run_config(path: str | Path, overrides: Sequence[str] = ()):
    yaml_config = _yaml_config()
    try:
        return yaml_config.load_run_config(path, overrides, instantiate_checks=False)
    except yaml_config.YamlConfigError as err:
        raise ConversionError(str(err)) from err


def _check_same_model(run, saved, given: str, run_yaml: Path) -> None:
    """``run`` (from ``given``) has the model and vocabulary of the checkpoint's own run.yaml."""
    yaml_config = _yaml_config()
    fields = [(key, getattr(run.model, key), getattr(saved.model, key))
              for section in ("language_model", "deepseekmoe")
              for key in yaml_config.SCHEMA[section]]
    fields.append(("vocab_size", run.train.vocab_size, saved.train.vocab_size))
    for key, got, trained in fields:
        if got != trained:
            raise ConversionError(
                f"{given} gives {key}={got!r}, but the checkpoint's {run_yaml} says {trained!r}: "
                "its run.yaml defines the model it was trained as (--config and --set describe "
                "only a checkpoint without one); drop the option that changes it")


def export_to_hf(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str = "auto",
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
                 tokenizer: bool | str | Path = True, allow_non_finite: bool = False,
                 config: str | Path | None = None, overrides: Iterable[str] = ()) -> Path:
    """Megatron dist checkpoint (any layout) -> Hugging Face directory; returns ``out_dir``.

    ``checkpoint_dir``: a save directory (its latest iteration) or an ``iter_XXXXXXX`` dir.
    ``config`` / ``overrides``: the run config of a checkpoint that has no run.yaml (one written
    by Megatron-LM's training loop), in place of the one it would carry; for one that has it,
    settings that leave its model unchanged (see ``read_checkpoint_run``).
    ``dtype``: ``auto`` (as stored in the checkpoint), ``bf16``, ``fp16`` or ``fp32``.
    ``tokenizer``: True (see ``choose_tokenizer``), False (no tokenizer files) or a directory
    of Hugging Face tokenizer files to include. ``allow_non_finite``: write NaN/inf weights
    instead of refusing them. Reads one layer at a time and needs no process group.
    """
    from dsmoe_megatron.hf import write_hf_remote_code

    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    max_shard_size = parse_size(max_shard_size)
    ckpt = _resolve_checkpoint(checkpoint_dir)
    run = read_checkpoint_run(ckpt, config, overrides)
    check_exportable(run.model)  # before anything is read or created
    vocab = run.train.vocab_size
    reader = DistCheckpointReader(ckpt)
    embedding = "embedding.word_embeddings.weight"
    if embedding not in reader.shapes:
        raise ConversionError(f"{ckpt} has no {embedding}; is it a model checkpoint of this "
                              "package?")
    if reader.shapes[embedding][0] < vocab:
        raise ConversionError(f"the checkpoint has {reader.shapes[embedding][0]} vocabulary rows "
                              f"but its run config says vocab_size={vocab}")
    cfg = single_rank_config(run.model, params_dtype=reader.dtype(embedding))
    dims = Dims.from_megatron(cfg, vocab)
    check_megatron_tensors(reader.shapes, dims)
    kept = kept_source(ckpt, vocab)
    if tokenizer is False:
        tok = TokenizerExport("none", {})
    else:
        tok = choose_tokenizer(kept, vocab, None if tokenizer is True else tokenizer)
    generation = {**generation_defaults(kept),
                  **{k: v for k, v in tok.token_ids.items() if v is not None}}
    out_dtype = DTYPES[dtype] if dtype != "auto" else cfg.params_dtype
    with _atomic_output(out_dir, force, source=ckpt) as (out, partial):
        max_pos = max(int(run.train.seq_length), int(run.train.max_position_embeddings or 0))
        config = hf_config_dict(cfg, vocab, max_pos, out_dtype,
                                **{k: tok.token_ids.get(k) for k in _TOKEN_ID_KEYS})
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        files = write_safetensors_shards(megatron_to_hf(reader.get, dims),
                                         hf_expected_shapes(dims), partial, max_shard_size,
                                         out_dtype, allow_non_finite=allow_non_finite)
        write_hf_remote_code(partial)  # after config.json: adds its auto_map
        tok_files = tok.write(partial, max_pos)
    log(f"wrote {out} from {ckpt}: {len(files)} safetensors shard(s), {DTYPE_NAMES[out_dtype]}, "
        f"vocab {vocab}; tokenizer: {', '.join(tok_files) if tok_files else 'none'}")
    return out


# ------------------------------------------------------------------------------------------
# from-hf
# ------------------------------------------------------------------------------------------

def read_hf_config(hf_dir: str | Path) -> dict:
    given, hf_dir = str(hf_dir), Path(hf_dir)
    if hf_dir.is_file():  # the index, config.json or a shard of the download
        raise ConversionError(
            f"--hf {hf_dir} is a file; --hf takes the model's directory, which holds "
            f"config.json and the safetensors files: pass --hf {hf_dir.parent}")
    if not hf_dir.is_dir():
        hub = (f"; --hf takes a local directory: download a model of the Hugging Face Hub first "
               f"(hf download {given} --local-dir DIR), then pass --hf DIR"
               if re.fullmatch(r"[\w.-]+/[\w.-]+", given) else "")
        raise ConversionError(f"Hugging Face directory {hf_dir} does not exist (--hf){hub}")
    path = hf_dir / "config.json"
    if not path.exists():
        from dsmoe_megatron import checkpoint

        ours = (f"; {hf_dir} is a checkpoint of dsmoe-train or Megatron-LM: to-hf exports it"
                if checkpoint.is_ours(hf_dir)
                or (hf_dir / checkpoint.MEGATRON_LM_TRACKER).exists() else "")
        snapshot = _hub_cache_snapshot(hf_dir)
        if snapshot is not None:  # `hf download` without --local-dir
            ours = (f"; it is the Hugging Face cache's folder of the model: pass its snapshot, "
                    f"--hf {snapshot}")
        raise ConversionError(f"{path} is missing, so {hf_dir} is not a Hugging Face model "
                              f"directory (--hf){ours}")
    hf = read_json(path, "replace it with a complete copy",
                   holding=' of model settings ("hidden_size": 2048, ...)')
    model_fields_from_hf(hf, where=str(path))  # what the Megatron model cannot represent
    return hf


def _hub_cache_snapshot(folder: Path) -> Path | None:
    """The model directory in a Hugging Face Hub cache folder (models--ORG--NAME): the snapshot
    refs/main names, else the newest one holding a config.json."""
    snapshots = [d for d in (folder / "snapshots").glob("*") if (d / "config.json").is_file()]
    ref = folder / "refs" / "main"
    main = folder / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    return main if main in snapshots else max(snapshots, key=lambda d: d.stat().st_mtime,
                                              default=None)


def make_run_config(model_fields: Mapping, vocab_size: int | None = None,
                    seq_length: int | None = None, overrides: Iterable[str] = (),
                    max_position_embeddings: int | None = None):
    """A yaml_config RunConfig for a model with these DeepSeekMoEConfig fields (plain values),
    each placed in its yaml_config section; the rest from the defaults and ``overrides``.
    ``vocab_size`` None means the byte tokenizer's."""
    yaml_config = _yaml_config()
    source: dict = {}
    for key, value in model_fields.items():
        section = yaml_config.section_of(key)
        if section is None:
            raise ConversionError(f"{key} is not a model field")
        source.setdefault(section, {})[key] = value
    for key, value in (("vocab_size", vocab_size), ("seq_length", seq_length),
                       ("max_position_embeddings", max_position_embeddings)):
        if value is not None:
            source[key] = int(value)
    origin = ("the model of the Hugging Face config.json with the layout flags "
              "(--tensor/--pipeline/--expert-model-parallel-size) and --set")
    try:
        return yaml_config.run_config_from_dict(source, tuple(overrides), origin=origin)
    except yaml_config.YamlConfigError as err:
        raise ConversionError(str(err)) from err


def build_run_config(hf: Mapping, overrides: Iterable[str] = ()):
    """RunConfig for training the HF model: its architecture and vocabulary from config.json,
    seq_length = max_position_embeddings unless overridden, the rest from defaults and
    ``overrides`` (yaml_config's ``section.key=value``)."""
    c = {**hf_defaults(), **hf}
    positions = int(c["max_position_embeddings"])
    overrides = tuple(overrides)
    seq_override = "seq_length" in _keys_set(overrides)
    return make_run_config(model_fields_from_hf(hf), c["vocab_size"],
                           None if seq_override else positions, overrides,
                           max_position_embeddings=positions)


# Fields that fix the shapes or the function of the weights; overrides may not change them.
_ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_num_shared_experts",
    "moe_first_k_dense", "moe_layer_freq", "moe_router_pre_softmax", "layernorm_epsilon",
    "rotary_base",
)


def _check_run_matches_hf(run, hf: Mapping) -> None:
    """Overrides may change training settings, not the architecture the weights have."""
    expected = model_fields_from_hf(hf)
    for key in _ARCHITECTURE_FIELDS:
        if key not in expected:
            continue
        got = getattr(run.model, key)
        if got != expected[key]:
            raise ConversionError(
                f"the run config has model.{key}={got!r} but the Hugging Face model has "
                f"{expected[key]!r}; architecture fields cannot be overridden")
    if "num_moe_experts" not in expected and run.model.num_moe_experts:
        raise ConversionError(
            f"the run config has model.num_moe_experts={run.model.num_moe_experts} but the "
            "Hugging Face model is dense; architecture fields cannot be overridden")
    check_exportable(run.model)
    if run.train.vocab_size != hf["vocab_size"]:
        raise ConversionError(
            f"the run config has vocab_size={run.train.vocab_size} but the Hugging Face model "
            f"has {hf['vocab_size']}; it cannot be overridden")


def _dtype_overrides(dtype: str) -> list[str]:
    if dtype == "auto":
        return []
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return [f"model_parallel.bf16={str(dtype == 'bf16').lower()}",
            f"model_parallel.fp16={str(dtype == 'fp16').lower()}"]


_SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def source_dtype(dtypes: Iterable[str]) -> str:
    """--dtype auto of from-hf: the dtype of the source's weights (the released models are
    bf16), so the import holds them exactly at their size; fp32 when they mix dtypes or hold
    another."""
    found = set(dtypes)
    return _SAFETENSORS_DTYPES.get(found.pop(), "fp32") if len(found) == 1 else "fp32"


def _sets_precision(overrides: Iterable[str]) -> bool:
    """An override sets model_parallel.bf16 or fp16 (which --dtype auto then leaves alone)."""
    return any(o.split("=", 1)[0].strip().split(".")[-1] in ("bf16", "fp16") for o in overrides)


def import_from_hf(hf_dir: str | Path, out_dir: str | Path, overrides: Iterable[str] = (),
                   force: bool = False, dtype: str = "auto", tokenizer: bool = True,
                   quiet: bool = False) -> Path:
    """Hugging Face directory -> save directory with an iteration-0 dist checkpoint + run.yaml.

    ``overrides``: yaml_config overrides for the run (``model_parallel.tensor_model_parallel_size
    =2``, ``lr=1e-4``...); architecture fields come from config.json and cannot be overridden.
    ``dtype``: the run's parameter dtype (``bf16`` / ``fp16`` set ``model_parallel.bf16`` /
    ``fp16``; ``auto``: that of the source's weights, unless an override sets bf16 / fp16);
    the checkpoint stores that.
    The vocabulary is padded for the run's tensor-parallel size, as the trainer builds it.
    The source's config.json and (unless ``tokenizer`` is False) tokenizer files are kept in
    ``out_dir/hf_source`` so a later to-hf can include them; a tokenizer file of broken JSON is
    refused. ``quiet``: no line naming ``out_dir`` (a temporary directory of the caller's).
    Returns ``out_dir`` (the trainer's ``load:``).
    """
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.model import build_model, padded_vocab_size

    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    if hf.get("pretraining_tp", 1) not in (None, 1):  # not in read_hf_config: analyze reads twice
        log(f"note: {hf_dir / 'config.json'}: pretraining_tp={hf['pretraining_tp']} only split "
            "matmuls; ignored")
    tok_files = tokenizer_files(hf_dir) if tokenizer else []
    if (hf_dir / "generation_config.json").is_file():  # kept for to-hf, which reads it
        read_json(hf_dir / "generation_config.json",
                  "replace it with a complete copy, or delete it (it holds generation defaults)")
    overrides = tuple(overrides)
    # The config and the layout are checked before the weights are opened: a wrong override
    # is reported as such even where the weights are missing or still downloading.
    run = build_run_config(hf, [*_dtype_overrides(dtype), *overrides])
    _check_run_matches_hf(run, hf)
    dims = hf_dims(hf)
    try:
        padded = padded_vocab_size(dims.vocab, run.layout.tensor)
    except ValueError as err:
        raise ConversionError(f"--tensor-model-parallel-size: {err}") from err
    reader = SafetensorsReader(hf_dir)
    shapes = {n: s for n, s in reader.shapes.items() if not IGNORED_HF_TENSORS.match(n)}
    if dtype == "auto" and not _sets_precision(overrides):
        dtype = source_dtype(reader.dtypes[n] for n in shapes)  # known only now
        run = build_run_config(hf, [*_dtype_overrides(dtype), *overrides])
    check_shapes(shapes, hf_expected_shapes(dims), f"{hf_dir}:", shape_of=lambda s: s)
    params_dtype = run.model.params_dtype

    def get(name: str) -> torch.Tensor:
        """The source tensor, refused where it does not fit in the run's dtype (bf16 or fp32
        weights beyond fp16's range would be written as inf)."""
        t = reader.get(name)  # finite: the reader checks
        if t.is_floating_point() and torch.finfo(params_dtype).max < torch.finfo(t.dtype).max:
            check_fits(f"{name} in {reader.files[name]}", t, t.to(params_dtype),
                       "import with --dtype bf16 or fp32")
        return t

    sources = hf_to_megatron(get, dims, padded)

    def tensor_of(key: str) -> torch.Tensor:
        return sources[canonical_name(key)]().to(params_dtype)

    with _atomic_output(out_dir, force, source=hf_dir) as (out, partial):
        kept = partial / HF_SOURCE_DIR
        kept.mkdir()
        for name in ("config.json", "generation_config.json", *tok_files):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, kept / name)
        yaml_path = partial / "run.yaml.tmp"
        _yaml_config().dump_run_config(run, yaml_path)
        run_yaml_text = yaml_path.read_text()
        yaml_path.unlink()
        with single_rank_runtime():
            cfg = single_rank_config(run.model, params_dtype=params_dtype)
            # The model only says what the checkpoint holds (keys, chunks, objects): on the meta
            # device it takes no memory, and the tensors come from `sources` as they are written.
            with torch.device("meta"):
                model = build_model(cfg, padded, run.train.seq_length, pre_process=True,
                                    post_process=True, use_te=False)
            _check_sources_fit(model, hf_to_megatron(
                lambda n: torch.empty(shapes[n], dtype=params_dtype, device="meta"), dims, padded))
            try:
                checkpoint.save(partial, 0, [model], run_config_yaml=run_yaml_text,
                                sharded_strategy=StreamingSaveStrategy(tensor_of))
            except checkpoint.CheckpointError as err:
                # A source tensor unreadable or broken (NaN/inf) as it was written: say that.
                cause = find_cause(err, ConversionError)
                if cause is None:
                    raise
                raise cause from None
    if not quiet:
        log(f"wrote {out}: iteration 0, {DTYPE_NAMES[params_dtype]}, vocab {dims.vocab} padded "
            f"to {padded} for tensor parallel size {run.layout.tensor}; tokenizer: "
            f"{', '.join(tok_files) if tok_files else 'none'}")
    return out


def _check_sources_fit(model, sources: Mapping) -> None:
    """Every tensor of the (meta) model has a source of its shape, and nothing else does."""
    own = {n: tuple(t.shape) for n, t in normalise_megatron_names(model.state_dict()).items()}
    made = {n: tuple(make().shape) for n, make in sources.items()}
    if own != made:
        wrong = sorted(n for n in set(own) | set(made) if own.get(n) != made.get(n))
        raise ConversionError("internal error: the mapped tensors do not fit the Megatron model: "
                              + "; ".join(f"{n}: model {own.get(n)}, mapped {made.get(n)}"
                                          for n in wrong[:8]))


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

_LAYOUT_FLAGS = (
    ("--tensor-model-parallel-size", "tensor_model_parallel_size"),
    ("--pipeline-model-parallel-size", "pipeline_model_parallel_size"),
    ("--expert-model-parallel-size", "expert_model_parallel_size"),
    ("--expert-tensor-parallel-size", "expert_tensor_parallel_size"),
    ("--virtual-pipeline-model-parallel-size", "virtual_pipeline_model_parallel_size"),
)


def _layout_overrides(args) -> list[str]:
    return [f"model_parallel.{field}={getattr(args, field)}" for _, field in _LAYOUT_FLAGS
            if getattr(args, field) is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsmoe-convert", description="Convert DeepSeekMoE checkpoints between Megatron "
        "dist checkpoints and Hugging Face (deepseek-moe-16b-base layout, safetensors).")
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="Megatron dist checkpoint -> Hugging Face directory")
    to_hf.add_argument("--checkpoint", required=True,
                       help="save directory (its latest iteration) or an iter_XXXXXXX directory")
    to_hf.add_argument("--out", required=True, help="Hugging Face output directory")
    to_hf.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                       help="weights dtype (auto: as stored in the checkpoint)")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    to_hf.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="directory of Hugging Face tokenizer files to include (default: the "
                       "ones from-hf kept, else the byte tokenizer's when the vocabulary fits)")
    to_hf.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")
    to_hf.add_argument("--allow-non-finite", action="store_true",
                       help="write NaN/inf weights instead of refusing them")
    to_hf.add_argument("--force", action="store_true", help="replace a non-empty --out")
    to_hf.add_argument("--config", default=None, metavar="YAML",
                       help="the run config, for a checkpoint without run.yaml (written by "
                       "Megatron-LM's training loop: its --dsmoe-yaml file)")
    to_hf.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="[SECTION.]KEY=VALUE",
                       help="with --config: an override, e.g. num_moe_experts=16 (repeatable)")
    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> Megatron dist checkpoint")
    from_hf.add_argument("--hf", required=True, help="directory with config.json + safetensors")
    from_hf.add_argument("--out", required=True,
                         help="save directory to create (run.yaml + iter_0000000; the "
                         "trainer's load:)")
    for flag, field in _LAYOUT_FLAGS:
        from_hf.add_argument(flag, dest=field, type=positive_int, default=None, metavar="N",
                             help=f"model_parallel.{field} in run.yaml")
    from_hf.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                         help="the run's parameter dtype, stored in the checkpoint and run.yaml "
                         "(auto: the source weights' dtype, unless --set model_parallel.bf16 or "
                         "fp16 is given)")
    from_hf.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="[SECTION.]KEY=VALUE",
                         help="run.yaml override, e.g. model_parallel.bf16=true or lr=1e-4 "
                         "(repeatable)")
    from_hf.add_argument("--no-tokenizer", action="store_true",
                         help="do not keep the source's tokenizer files for to-hf")
    from_hf.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dsmoe_megatron import checkpoint

    args = build_parser().parse_args(quiet_warnings(argv))
    try:
        if args.command == "to-hf":
            export_to_hf(args.checkpoint, args.out, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, force=args.force,
                         tokenizer=False if args.no_tokenizer else (args.tokenizer or True),
                         allow_non_finite=args.allow_non_finite, config=args.config,
                         overrides=args.overrides)
        else:
            import_from_hf(args.hf, args.out, overrides=[*_layout_overrides(args),
                                                         *args.overrides],
                           force=args.force, dtype=args.dtype,
                           tokenizer=not args.no_tokenizer)
    except ConversionError as err:
        print(f"dsmoe-convert: error: {err}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError, checkpoint.CheckpointError) as err:
        # --out not creatable, a full disk, ...: said for --out (the save goes to <out>.partial)
        what = f"{args.command} stopped, nothing at --out {args.out} changed"
        print(f"dsmoe-convert: error: {describe_os_error(what, err, args.out)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
