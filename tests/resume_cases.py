"""Rank functions for the resume tests: several dsmoe-train runs in one spawned job.

A job is a list of tasks run in turn on every rank: ``("train", argv)`` is ``train.main(argv)``
in this process (the job's process group is reused; each run brings up its own parallel state
for the layout its overrides name), the other tasks inspect what the trainer builds.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "yaml_configs" / "tiny.yaml")

# A small DeepSeekMoE (12 routed experts, top-4, 2 shared, a2 = 0.05) whose routed experts are
# wide against the hidden size (most of the parameters; not most of the first gradient norm).
MODEL = [
    "language_model.num_layers=4", "language_model.hidden_size=32",
    "language_model.num_attention_heads=4", "language_model.ffn_hidden_size=64",
    "language_model.num_moe_experts=12", "language_model.moe_router_topk=4",
    "language_model.moe_ffn_hidden_size=96", "deepseekmoe.moe_num_shared_experts=2",
    "deepseekmoe.moe_device_balance_coeff=0.05",
    # The device-level loss groups experts; fixed so that it is the same loss on every layout.
    "deepseekmoe.moe_device_groups=4",
    "seq_length=32", "micro_batch_size=2", "global_batch_size=8",
    "lr=3e-3", "min_lr=3e-4", "lr_warmup_iters=1", "lr_decay_style=cosine",
    "eval_interval=null", "log_interval=1", "tensorboard_dir=null", "split=98,2,0",
]

# Layouts by name, as model_parallel overrides (the world size gives the data-parallel size).
LAYOUTS = {
    "1": [],
    "DP2": [],
    "EP2": ["model_parallel.expert_model_parallel_size=2"],
    "EP4": ["model_parallel.expert_model_parallel_size=4"],
    "TP2+SP": ["model_parallel.tensor_model_parallel_size=2",
               "model_parallel.sequence_parallel=true"],
    "PP2": ["model_parallel.pipeline_model_parallel_size=2"],
    "PP2-interleaved": ["model_parallel.pipeline_model_parallel_size=2",
                        "model_parallel.virtual_pipeline_model_parallel_size=2"],
    # The first stage holds layer 1 alone, the dense one: no MoE layer, no routed expert.
    "PP2-dense-stage": ["model_parallel.pipeline_model_parallel_size=2",
                        "model_parallel.num_layers_in_first_pipeline_stage=1"],
    "DP2xEP2": ["model_parallel.expert_model_parallel_size=2"],
    "TP2xEP2": ["model_parallel.tensor_model_parallel_size=2",
                "model_parallel.expert_model_parallel_size=2"],
}
WORLD = {"1": 1, "DP2": 2, "EP2": 2, "EP4": 4, "TP2+SP": 2, "PP2": 2, "PP2-interleaved": 2,
         "PP2-dense-stage": 2, "DP2xEP2": 4, "TP2xEP2": 4}


def train_argv(data_path: str, layout: str, save: Path, *extra: str) -> list[str]:
    return [TINY, *MODEL, *LAYOUTS[layout], f"data_path=[{data_path}]", f"save={save}", *extra]


def save_dir(argv: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in argv if a.startswith("save=")))


def run_job(tasks: list[tuple]) -> list:
    """Rank function: run each (kind, *args) task in turn; returns their results."""
    kinds = {"train": train, "resume_copy": resume_copy, "train_interrupted": train_interrupted,
             "train_while_locked": train_while_locked, "train_disk_full": train_disk_full,
             "damage": damage, "listing": listing, "rename": rename,
             "killed_during_save": killed_during_save,
             "killed_before_latest": killed_before_latest,
             "initial_weights": initial_weights, "expert_gradient_share": expert_gradient_share,
             "resumed_checkpoint": resumed_checkpoint, "weight_decays": weight_decays,
             "experts_on_gpu_rng": experts_on_gpu_rng,
             "extra_state_round_trip": extra_state_round_trip,
             "damaged_tensor_data": damaged_tensor_data, "with_adam": with_adam,
             "save_over_a_file_size_limit": save_over_a_file_size_limit}
    return [kinds[kind](*args) for kind, *args in tasks]


def with_adam(adam: str, kind: str, *args):
    """Another task, with torch's AdamW (adam="torch") or with Megatron-core as it runs with
    Transformer Engine: TE's FusedAdam (adam="fused", its stand-in, tests/fused_adam.py). A
    task that raises returns the traceback as its stderr (code None): the next tasks go on."""
    import traceback

    from fused_adam import as_with_transformer_engine

    try:
        with as_with_transformer_engine() if adam == "fused" else contextlib.nullcontext():
            return run_job([(kind, *args)])[0]
    except Exception:  # noqa: BLE001 - the test reports it
        return {"code": None, "stderr": traceback.format_exc()}


def train(argv: list[str]) -> dict:
    """dsmoe-train's main() in this process: exit code, stderr, metrics (rank 0)."""
    import torch.distributed as dist

    from dsmoe_megatron import train as trainer

    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = trainer.main(argv)
    save = save_dir(argv)
    metrics = save / "metrics.jsonl"
    records = None
    if dist.get_rank() == 0 and metrics.exists():
        records = [json.loads(line, parse_constant=_not_json)
                   for line in metrics.read_text().splitlines()]
    return {"code": code, "stderr": stderr.getvalue(), "stdout": stdout.getvalue(),
            "records": records}


def _not_json(constant: str):
    raise ValueError(f"metrics.jsonl holds {constant}, which strict JSON readers (jq) refuse")


def resume_copy(source: str, argv: list[str], iteration: int) -> dict:
    """``train(argv + --resume)`` in a save dir holding a copy of the run in ``source`` as if it
    had stopped after ``iteration``: that checkpoint, run.yaml, and metrics.jsonl with the later
    records, which the resumed run must set aside."""
    import shutil

    import torch.distributed as dist

    save = save_dir(argv)
    if dist.get_rank() == 0:
        keep = f"iter_{iteration:07d}"
        shutil.copytree(source, save, ignore=lambda folder, names: [
            n for n in names if Path(folder) == Path(source) and n.startswith("iter_")
            and n != keep])
        (save / "latest").write_text(str(iteration))
    dist.barrier()
    return train([*argv, "--resume"])


def train_interrupted(argv: list[str], when: str, signal_name: str = "SIGINT") -> dict:
    """train() with Ctrl-C (a real SIGINT; or ``signal_name``, e.g. a scheduler's SIGTERM) right
    after the first checkpoint is complete (when="after save") or while it is being written
    (when="during save")."""
    import signal
    from unittest import mock

    from dsmoe_megatron import checkpoint

    real_save = checkpoint.dist_checkpointing.save

    def write_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        signal.raise_signal(getattr(signal, signal_name))

    def save_then_interrupt(*args, **kwargs):
        saved = real_checkpoint_save(*args, **kwargs)
        signal.raise_signal(getattr(signal, signal_name))
        return saved

    real_checkpoint_save = checkpoint.save
    # A Ctrl-C at a terminal. A job started in the background by a shell without job control
    # (`pytest ... &`) inherits SIGINT ignored, and Python keeps it so: nothing would arrive.
    if signal_name == "SIGINT":
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if when == "during save":
        patch = mock.patch.object(checkpoint.dist_checkpointing, "save", write_then_interrupt)
    else:
        patch = mock.patch.object(checkpoint, "save", save_then_interrupt)
    with patch:
        return train(argv)


HOLD_RUN_LOCK = """
import sys, time
from dsmoe_megatron.run_dir import lock_save_dir
lock_save_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def train_while_locked(argv: list[str]) -> dict:
    """train(argv) while another process (a live run, as far as the lock tells) holds the save
    directory's run lock, and again after that process is SIGKILLed (single rank)."""
    import subprocess
    import sys

    save = save_dir(argv)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN_LOCK, str(save)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = train(argv)
        files_while_refused = sorted(p.name for p in save.iterdir())
    finally:
        holder.kill()
        holder.wait()
    return {"refused": refused, "holder_pid": holder.pid,
            "files_while_refused": files_while_refused, "after_kill": train(argv)}


def train_disk_full(argv: list[str], full_at_save: int) -> dict:
    """train(argv) with the disk full at the ``full_at_save``-th checkpoint, failing as
    Megatron's writer fails: a CheckpointException on every rank, the rank's OSError only in
    rank 0's (the coordinator's). Returns rank 0's result with every rank's stderr, `latest`
    and the partial checkpoints left right after."""
    import errno
    import os
    from unittest import mock

    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    from dsmoe_megatron import checkpoint

    real_save, calls = checkpoint.dist_checkpointing.save, [0]

    def fill_the_disk(state, directory, **kwargs):
        calls[0] += 1
        if calls[0] < full_at_save:
            return real_save(state, directory, **kwargs)
        shard = Path(directory) / f"__{dist.get_rank()}_0.distcp"
        shard.write_bytes(b"x" * 2**20)  # what it got to write
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(shard))
        raise CheckpointException("write", {0: (full, None)} if dist.get_rank() == 0 else {})

    with mock.patch.object(checkpoint.dist_checkpointing, "save", fill_the_disk):
        result = train(argv)
    stderr = [None] * dist.get_world_size()
    dist.all_gather_object(stderr, result["stderr"])
    save = save_dir(argv)
    return {**result, "stderr_by_rank": stderr, "latest": (save / "latest").read_text(),
            "partial": [p.name for p in save.glob("*.partial")]}


def killed_during_save(save: str, iteration: int) -> None:
    """What a SIGKILL while saving ``iteration`` leaves (after it had logged that iteration):
    its directory still ``.partial``, ``latest`` naming the one before."""
    final = Path(save) / f"iter_{iteration:07d}"
    final.rename(final.with_name(final.name + ".partial"))
    (Path(save) / "latest").write_text(str(iteration - 1))


def killed_before_latest(argv: list[str], iteration: int) -> dict:
    """train(argv) stopped as a SIGKILL would stop it right after the checkpoint of
    ``iteration`` is renamed into place, before ``latest`` is written to name it."""
    from unittest import mock

    from dsmoe_megatron import checkpoint

    real_write = checkpoint.write_text_atomic

    def write_or_die(path, text):
        if path.name == checkpoint.LATEST_NAME and text == str(iteration):
            raise KeyboardInterrupt("killed")
        real_write(path, text)

    with mock.patch.object(checkpoint, "write_text_atomic", write_or_die):
        return train(argv)


def listing(directory: str) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir())


def rename(path: str, to: str) -> None:
    """Rank 0 renames ``path`` (a run killed between keep_checkpoints' rename and deletion)."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        Path(path).rename(to)


def damage(save: str, copy: str, file: str, how: str) -> None:
    """Copy a save directory and damage one file of the copy as disks and interrupted copies
    do: "delete" it, "truncate" it to half, or replace its contents with the text `how`."""
    import shutil

    shutil.copytree(save, copy)
    target = Path(copy) / file
    if how == "delete":
        target.unlink()
    elif how == "truncate":
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)
    else:
        target.write_text(how)


def _trainer(argv: list[str], resume: str = "never"):
    from dsmoe_megatron import train as trainer
    from dsmoe_megatron.yaml_config import load_run_config

    args = trainer.parse_args(argv)
    return trainer.Trainer(load_run_config(args.config, args.overrides), resume=resume)


def resumed_checkpoint(argv: list[str], directory: str) -> None:
    """Resume the run in argv's save dir (no training) and save what was loaded, model and
    optimizer, to `directory`."""
    from dsmoe_megatron import checkpoint, runtime

    trainer = _trainer(argv, resume="always")
    checkpoint.save(directory, trainer.iteration, trainer.model, trainer.optimizer)
    runtime.shutdown(destroy_process_group=False)


def weight_decays(argv: list[str]) -> list[tuple[float, float]]:
    """Single rank: each optimizer group's (wd_mult, weight_decay) after one step."""
    from dsmoe_megatron import runtime

    trainer = _trainer([*argv, "save=null"])
    trainer.train_step()
    groups = [(g["wd_mult"], g["weight_decay"]) for g in trainer.optimizer.param_groups]
    runtime.shutdown(destroy_process_group=False)
    return groups


def initial_weights(argv: list[str], directory: str) -> None:
    """Build the trainer's model (no training) and save its initial weights to `directory`."""
    from dsmoe_megatron import checkpoint, runtime

    model = _trainer([*argv, "save=null"]).model
    checkpoint.save(directory, 0, model)
    runtime.shutdown(destroy_process_group=False)


def expert_gradient_share(argv: list[str]) -> float:
    """Single rank: the routed experts' share of the squared gradient norm after one step."""
    from dsmoe_megatron import runtime

    trainer = _trainer([*argv, "save=null"])
    trainer.train_step()
    squares = {True: 0.0, False: 0.0}
    for chunk in trainer.model:
        for param in chunk.parameters():
            expert = not getattr(param, "allreduce", True)
            squares[expert] += float(param.main_grad.double().pow(2).sum())
    runtime.shutdown(destroy_process_group=False)
    return squares[True] / (squares[True] + squares[False])


@contextlib.contextmanager
def _gpu_like_rng():
    """Megatron's RNG tracker on its own generator, as on a GPU (where it forks the CUDA
    generator): the CPU compatibility layer otherwise points it at the CPU generator, which
    hides draws made on the CPU outside the tracker's stream."""
    from megatron.core.tensor_parallel import random as mcore_random

    fake_cuda = torch.Generator()
    patches = [(mcore_random, "_get_cuda_rng_state", lambda *a, **k: fake_cuda.get_state()),
               (mcore_random, "_set_cuda_rng_state", lambda state, *a, **k:
                fake_cuda.set_state(state)),
               (torch.cuda, "manual_seed", fake_cuda.manual_seed)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def experts_on_gpu_rng(argv: list[str], seeds: tuple[int, int]) -> dict:
    """With a GPU-like RNG: layer 1's routed experts (gathered over EP) as Megatron-core's
    construction alone draws them and as the trainer initialises them, for two seeds."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from dsmoe_megatron import runtime
    from dsmoe_megatron.model import build_model_chunks

    def gathered(model) -> torch.Tensor:
        chunk = model[0]
        while hasattr(chunk, "module"):
            chunk = chunk.module
        local = chunk.decoder.layers[1].mlp.experts.gate_up_proj.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(ps.get_expert_model_parallel_world_size())]
        dist.all_gather(parts, local, group=ps.get_expert_model_parallel_group())
        return torch.cat(parts)

    out = {}
    with _gpu_like_rng():
        for seed in seeds:
            trainer = _trainer([*argv, "save=null", f"seed={seed}"])
            out[f"trainer seed {seed}"] = gathered(trainer.model)
            # The construction alone, with the generators seeded alike on every rank as a
            # launcher does (torch.manual_seed(seed); Megatron's tracker per EP rank).
            torch.manual_seed(seed)
            model_parallel_cuda_manual_seed(seed)
            plain = build_model_chunks(trainer.config, trainer.padded_vocab,
                                       trainer.run.train.seq_length)
            out[f"construction seed {seed}"] = gathered(plain)
            runtime.shutdown(destroy_process_group=False)
    return out if dist.get_rank() == 0 else None


@contextlib.contextmanager
def _attention_extra_state():
    """Megatron's local core attention with an `_extra_state`, as Transformer Engine's has (its
    FP8 metadata): the model then asks checkpoints for one ShardedObject per layer."""
    from unittest import mock

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # As Transformer Engine's modules do: the state dict, `_extra_state` as a ShardedObject.
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])

    with mock.patch.object(DotProductAttention, "get_extra_state",
                           lambda self: torch.tensor([1.0]), create=True), \
            mock.patch.object(DotProductAttention, "set_extra_state",
                              lambda self, state: None, create=True), \
            mock.patch.object(DotProductAttention, "sharded_state_dict", sharded_state_dict):
        yield


def extra_state_round_trip(directory: str) -> dict:
    """Save with / load without the attention's extra state, and the other way round; returns
    the keys of each checkpoint and the loaded weights' agreement with the saved ones."""
    from torch.distributed.checkpoint import FileSystemReader

    from common import build_chunks, tiny_config
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.runtime import ParallelLayout

    def weights(model):
        return {k: v for k, v in model[0].state_dict().items()
                if torch.is_tensor(v) and not k.endswith("_extra_state")}

    out = {}
    for name, save_with_extra in (("gpu to cpu", True), ("cpu to gpu", False)):
        torch.manual_seed(0)
        with _attention_extra_state() if save_with_extra else contextlib.nullcontext():
            saved = build_chunks(tiny_config(ParallelLayout()))
            checkpoint.save(f"{directory}/{name}", 0, saved)
        torch.manual_seed(1)
        with contextlib.nullcontext() if save_with_extra else _attention_extra_state():
            loaded = build_chunks(tiny_config(ParallelLayout()))
            checkpoint.load(f"{directory}/{name}", loaded)
        keys = FileSystemReader(f"{directory}/{name}/iter_0000000").read_metadata()
        out[name] = {
            "checkpoint has attention extra state": any(
                "core_attention._extra_state" in k for k in keys.state_dict_metadata),
            "weights equal": weights(saved).keys() == weights(loaded).keys() and all(
                torch.equal(a, weights(loaded)[k]) for k, a in weights(saved).items()),
        }
    return out


def damaged_tensor_data(directory: str, tensor_parallel: int) -> dict:
    """Save a model, change bytes of its .distcp files as failing disks do, and load it: what
    each rank's load raised (None: nothing), per case. "nan": the first weight of rank 0's shard
    of a shared-expert weight becomes NaN (rank 1 holds none of it); "garbled": the first bytes
    of a file, where an item's header is, become zeros."""
    import torch.distributed as dist

    from common import build_chunks, tiny_config
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.runtime import ParallelLayout

    config = tiny_config(ParallelLayout(tensor=tensor_parallel))
    name = "decoder.layers.1.mlp.shared_experts.linear_fc1.weight"
    out = {}
    for case in ("nan", "garbled"):
        torch.manual_seed(0)
        saved = build_chunks(config)
        save = Path(directory) / case
        checkpoint.save(save, 0, saved)
        if dist.get_rank() == 0:
            files = sorted((save / "iter_0000000").glob("*.distcp"))
            if case == "nan":
                weights = saved[0].get_parameter(name).detach().cpu().numpy().tobytes()[:64]
                [(file, at)] = [(f, f.read_bytes().find(weights)) for f in files
                                if weights in f.read_bytes()]
                replacement = torch.tensor([float("nan")]).numpy().tobytes()
            else:
                file, at, replacement = files[0], 0, bytes(8)
            with open(file, "r+b") as f:
                f.seek(at)
                f.write(replacement)
        dist.barrier()
        try:
            checkpoint.load(save, build_chunks(config))
            out[case] = None
        except checkpoint.CheckpointError as error:
            out[case] = str(error)
    return out


def save_over_a_file_size_limit(directory: str) -> str:
    """Save a model where no file may pass 64 KiB (RLIMIT_FSIZE, as ulimit -f: the write fails
    with EFBIG, as one over a quota fails with EDQUOT, while the disk has room); returns the
    error the save raised on this rank."""
    import resource

    import torch.distributed as dist

    from common import build_chunks, tiny_config
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.runtime import ParallelLayout

    torch.manual_seed(0)
    chunks = build_chunks(tiny_config(ParallelLayout(tensor=dist.get_world_size())))
    save = Path(directory)
    if dist.get_rank() == 0:
        (save / checkpoint.LATEST_NAME).write_text("2")
    dist.barrier()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**10, hard))
    try:
        checkpoint.save(save, 4, chunks)
    except checkpoint.CheckpointError as error:
        return str(error)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return "saved"
