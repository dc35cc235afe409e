"""dsmoe-train CONFIG [key=value ...] [--resume [auto] | --overwrite] [--stop-at N]: pretrain a
DeepSeekMoE model on Megatron-core.

Single process on CPU, or under torchrun / srun (one process per GPU). GPTModel with the
DeepSeekMoE specs, Megatron-core DDP + (distributed) optimizer, its pipeline schedules, LR warmup
then the paper's step decay (or cosine / constant), gradient clipping, fp32 / bf16 / fp16.

Initial weights depend on the seed only (dsmoe_megatron.initialization), so every layout starts
from the same model; a checkpoint resumes under any layout with its optimizer state, and
hyper-parameters (lr, schedule, train_iters, ...) come from the config, not the checkpoint.
A checkpoint is written only from finite weights whose next forward pass gives a finite loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dsmoe_megatron.cli import (PEER_EXITED, describe_os_error, peer_exited, positive_int,
                                print_error, quiet_warnings, quiet_when_run_as_main)

quiet_when_run_as_main(__name__)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dsmoe_megatron.checkpoint import CheckpointError  # noqa: E402


# The settings a resume reports when the config changes them: what the optimization follows
# (the global batch and seq_length are reported on their own).
_TRAINED_WITH = ("train_iters", "lr", "min_lr", "lr_warmup_iters", "lr_decay_style",
                 "lr_step_decay_at", "lr_step_decay_factor", "weight_decay", "adam_beta1",
                 "adam_beta2", "adam_eps", "clip_grad", "seed", "data_path", "split")


class TrainingDiverged(RuntimeError):
    def __init__(self, message: str, step: StepStats | None = None):
        super().__init__(message)
        self.step = step  # the step that diverged, when it ran to the end: logged before stopping


class RunComplete(Exception):
    """A resume found the run in ``save`` at train_iters already: nothing to build or load."""


def different_model(ckpt: Path, difference: tuple, resume: bool) -> CheckpointError:
    """The error for a checkpoint of another model (checkpoint.model_difference's field, saved
    and current value), with the override that loads it."""
    from dsmoe_megatron.yaml_config import override_text, section_of

    field, then, now = difference
    name = field if field == "vocab_size" else f"{section_of(field)}.{field}"
    setting = f"{name}={override_text(then)}"
    fix = (f"resume with {setting}, or start a new run in another save directory (load: DIR "
           "initialises a new run from a checkpoint of the same model)"
           if resume else f"set {setting} to start from it, or set load: null to start from "
           "random weights")
    return CheckpointError(
        f"{ckpt} was saved from a different model: {name} is {override_text(then)} there and "
        f"{override_text(now)} here; {fix}")


def check_corpus_tokenizer(train) -> None:
    """``data_path: null`` trains on the shipped corpus in the byte tokenizer's ids: refused for
    a run from a from-hf import with a tokenizer of its own."""
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.config import ConfigError
    from dsmoe_megatron.convert import byte_corpus_mismatch, kept_source

    try:
        ckpt = checkpoint.resolve(train.load)
    except CheckpointError:  # removed since the run started from it: a resume does not read it,
        return  # and a new run's load names the problem
    problem = byte_corpus_mismatch(
        kept_source(ckpt, train.vocab_size), train.vocab_size,
        "data_path is null, which trains on", f"load: {train.load} (a Hugging Face import)",
        "set data_path to its prefix")
    if problem:
        raise ConfigError(problem)


def imported_tokenizer(train) -> tuple[Path, list[str]] | None:
    """(directory, file names) of the tokenizer of the from-hf import the run started from
    (``load:``), where it has one of its own."""
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.convert import kept_source, tokenizer_files

    if not train.load:
        return None
    try:
        kept = kept_source(checkpoint.resolve(train.load), train.vocab_size)
    except CheckpointError:
        return None
    files = tokenizer_files(kept, "replace it with a complete copy of the model's original "
                            "file") if kept else []
    return (kept, files) if files else None


def learning_rate(train, updates: int) -> float:
    """The lr of the update after ``updates`` applied ones: linear warmup, then step decay (x
    factor at each fraction of train_iters), cosine or constant."""
    if train.lr_warmup_iters and updates < train.lr_warmup_iters:
        return train.lr * (updates + 1) / train.lr_warmup_iters
    if train.lr_decay_style == "constant":
        return train.lr
    if train.lr_decay_style == "step":
        drops = sum(updates >= round(f * train.train_iters) for f in train.lr_step_decay_at)
        return train.lr * train.lr_step_decay_factor ** drops
    span = max(1, train.train_iters - train.lr_warmup_iters)
    progress = min(1.0, (updates - train.lr_warmup_iters) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class StepStats:
    loss: float
    aux: dict[str, float]
    grad_norm: float | None
    tokens: int
    seconds: float
    lr: float
    updated: bool = True  # False: fp16 skipped the step (inf/NaN gradients at this loss scale)


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _log(message: str) -> None:
    if _rank0():
        print(message, flush=True)


def _describe_layout(layout) -> str:
    etp = layout.expert_tensor or layout.tensor
    return (f"TP{layout.tensor} PP{layout.pipeline} EP{layout.expert} expert-TP{etp}"
            + (f" VPP{layout.virtual_pipeline}" if layout.virtual_pipeline else "")
            + (" SP" if layout.sequence_parallel else ""))


class Trainer:
    def __init__(self, run, resume: str = "never", overwrite: bool = False):
        """``resume``: "never" (a new run), "always" (continue the run in ``save``) or "auto"
        (continue it if it has a checkpoint); see dsmoe_megatron.run_dir."""
        from megatron.core import parallel_state as ps

        from dsmoe_megatron import runtime
        from dsmoe_megatron.model import padded_vocab_size
        from dsmoe_megatron.run_dir import Deletions
        from dsmoe_megatron.tokenizer import ByteTokenizer
        from dsmoe_megatron.yaml_config import check_world_size

        self.started = time.monotonic()  # exit_duration_in_mins counts setup too
        self.stopped_early: str | None = None
        self.deletions = Deletions()  # rank 0's
        self.run = run
        train = run.train
        self.rt = runtime.initialize(run.layout, seed=train.seed,
                                     num_experts=run.model.num_moe_experts)
        check_world_size(run, self.rt.world_size)
        if train.data_path is not None:  # before --overwrite deletes anything
            from dsmoe_megatron.data import check_blend

            check_blend(train.data_path, train.split, train.seq_length,
                        valid=bool(train.eval_interval))
        elif train.load is not None:
            check_corpus_tokenizer(train)
        resume = self._claim_save_dir(resume, overwrite)
        if resume:
            try:
                self._stop_if_complete()
            except RunComplete:  # a chained job's last start: leave nothing to delete
                self.deletions.wait()
                raise
        self.config = run.model
        self.config.pipeline_dtype = self.config.params_dtype
        self.tokenizer = ByteTokenizer()
        self.vocab_size = train.vocab_size or self.tokenizer.vocab_size
        self.padded_vocab = padded_vocab_size(self.vocab_size, run.layout.tensor)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.num_microbatches = train.num_microbatches(self.dp_size)
        self.model = self._build_model()
        self.optimizer = self._build_optimizer()
        # The schedules scale the loss by the fp16 loss scale before backward (1 otherwise).
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.iteration = 0
        # Updates applied: the lr schedule's clock. fp16 skips the steps whose gradients
        # overflow, and as in Megatron-LM a skipped step does not advance the schedule.
        self.updates = 0
        self.consumed_samples = 0
        self.saved_data_indexes: tuple[Path, dict] | None = None  # set by a checkpoint's load
        self._load_if_asked(resume)
        self.train_ds, self.valid_ds = self._build_data()
        self._say_which_datasets_changed()
        self._warn_if_splits_are_small()
        self.writer = self._tensorboard()
        self.metrics_file = self._prepare_save_dir() if _rank0() and train.save else None

    def _claim_save_dir(self, resume: str, overwrite: bool) -> bool:
        """Rank 0 takes the save directory's run lock, then decides (and with --overwrite
        clears) for all ranks: one view of the files. Holding the lock, it sets aside what a run
        killed mid-save left (``.partial`` directories: no live run writes them) and deletes it
        in the background, with what keep_checkpoints had not deleted (``.deleting`` ones)."""
        from dsmoe_megatron.checkpoint import set_aside_unfinished_saves
        from dsmoe_megatron.run_dir import (RunDirError, decide_resume, lock_save_dir,
                                            unlock_save_dir)

        outcome, save = [None], self.run.train.save
        if _rank0():
            try:
                if save is not None:
                    lock_save_dir(save)
                cut_short = unfinished = []
                if save is not None:
                    cut_short = [p.name for p in sorted(Path(save).glob("iter_*.deleting"))]
                resumed, removed = decide_resume(save, resume, overwrite)
                if save is not None:
                    unfinished = [p.name.removesuffix(".deleting")
                                  for p in set_aside_unfinished_saves(save)]
                outcome[0] = resumed, removed, unfinished, cut_short
            except OSError as error:  # read-only, under a file, ...
                outcome[0] = RunDirError(describe_os_error(f"cannot use save={save}", error))
            except (RunDirError, CheckpointError) as error:
                outcome[0] = error
            if isinstance(outcome[0], Exception) and save is not None:
                unlock_save_dir(save, remove=True)
        dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        resumed, removed, unfinished, cut_short = outcome[0]
        if removed:
            _log(f"--overwrite: deleting the previous run's {len(removed)} files in "
                 f"{self.run.train.save}")
        if unfinished:
            _log(f"deleting the unfinished save of an interrupted run: {', '.join(unfinished)}")
        if cut_short:
            _log(f"deleting {', '.join(cut_short)}, set aside by a killed run that had not "
                 "deleted them")
        if _rank0() and (removed or unfinished or cut_short):  # the first save waits for it
            self.deletions.start(save, "--overwrite" if removed else "left by a killed run")
        return resumed

    # ---- construction ---------------------------------------------------------------------
    def _warn_if_splits_are_small(self) -> None:
        if not _rank0():
            return
        train = self.run.train
        batch = train.global_batch(self.dp_size)
        if len(self.train_ds) < batch:
            print(f"warning: the train split holds {len(self.train_ds)} samples of "
                  f"{train.seq_length} tokens, fewer than one global batch ({batch}): every step "
                  "repeats samples; add data, a larger train share of split, or a smaller "
                  "global_batch_size or seq_length", file=sys.stderr, flush=True)
        valid = len(self.valid_ds) if self.valid_ds is not None else math.inf
        if valid < train.eval_iters * batch:
            fits = valid // batch
            print(f"warning: the valid split holds {valid} samples of "
                  f"{train.seq_length} tokens, fewer than an evaluation reads (eval_iters x "
                  f"global batch = {train.eval_iters} x {batch}): each evaluation repeats "
                  "samples and valid_loss weights some of them more than others; "
                  + (f"set eval_iters <= {fits}, or " if fits else "")
                  + "add data or a larger valid share of split", file=sys.stderr, flush=True)

    def _prepare_save_dir(self):
        """Rank 0: the run's config beside its checkpoints, and what a crashed attempt logged or
        saved past the checkpoint this run continues from set aside; returns metrics.jsonl,
        open to append."""
        from dsmoe_megatron.checkpoint import RUN_CONFIG_NAME
        from dsmoe_megatron.run_dir import (METRICS_NAME, rewind_metrics,
                                            set_aside_newer_checkpoints)
        from dsmoe_megatron.yaml_config import dump_run_config

        train = self.run.train
        Path(train.save).mkdir(parents=True, exist_ok=True)
        # The merged config beside the checkpoints; each checkpoint carries a copy.
        dump_run_config(self.run, Path(train.save) / RUN_CONFIG_NAME)
        moved = rewind_metrics(train.save, self.iteration)
        if moved:
            since = (f"after iteration {self.iteration} (after the checkpoint resumed from)"
                     if self.iteration else "by an earlier run that saved no checkpoint")
            _log(f"moved {moved} metrics records logged {since} to metrics.discarded.jsonl")
        aside = set_aside_newer_checkpoints(train.save, self.iteration)
        if aside:
            _log(f"kept the checkpoints past the one resumed from, which this run would "
                 f"replace, as {', '.join(aside)} in {train.save}; delete them when not "
                 "needed")
        return open(Path(train.save) / METRICS_NAME, "a")

    def _build_model(self):
        from megatron.core.transformer.module import Float16Module

        from dsmoe_megatron.initialization import record_init_methods, redraw_initial_weights
        from dsmoe_megatron.model import build_model_chunks

        train = self.run.train
        with record_init_methods(self.config) as record:
            chunks = [chunk.to(self.rt.device) for chunk in build_model_chunks(
                self.config, self.padded_vocab, train.seq_length, self.vocab_size)]
        redraw_initial_weights(chunks, record, train.seed)
        if self.config.bf16 or self.config.fp16:
            chunks = [Float16Module(self.config, chunk) for chunk in chunks]
        overlap = train.overlap_grad_reduce
        return wrap_ddp(
            chunks, self.config, train.use_distributed_optimizer,
            overlap_grad_reduce=self.rt.device.type == "cuda" if overlap is None else overlap,
            bucket_size=train.ddp_bucket_size,
        )

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        train = self.run.train
        opt_config = OptimizerConfig(
            optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
            clip_grad=train.clip_grad, bf16=self.config.bf16, fp16=self.config.fp16,
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=train.use_distributed_optimizer,
            loss_scale=train.loss_scale, initial_loss_scale=train.initial_loss_scale,
        )
        return get_megatron_optimizer(opt_config, self.model)

    def _build_data(self):
        from dsmoe_megatron.data import (blend_index_digests, build_gpt_datasets,
                                         default_corpus_prefix)

        train = self.run.train
        data_path = train.data_path
        # The save directory is shared by every node and writable; a dataset may be neither.
        cache = Path(train.save or "runs") / "data_cache"
        if data_path is None:
            data_path = [default_corpus_prefix(cache, self.tokenizer)] if _rank0() else None
            if dist.is_initialized():
                holder = [data_path]
                dist.broadcast_object_list(holder, src=0)
                data_path = holder[0]
        self.data_indexes = blend_index_digests(data_path)  # kept in each checkpoint
        # One pass over each split, whatever train_iters: a run extended on resume keeps its
        # sample stream (iterate_batches reshuffles per pass).
        # Without evaluation the valid split is neither built nor required to hold a sample.
        return build_gpt_datasets(data_path, train.seq_length, train.seed, split=train.split,
                                  tokenizer=self.tokenizer, cache_dir=cache / "index",
                                  valid=bool(train.eval_interval))

    def _tensorboard(self):
        if not (_rank0() and self.run.train.tensorboard_dir):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _log("tensorboard is not installed: logging to the console and metrics.jsonl only")
            return None
        _quiet_tensorboard_writer_thread()
        # A resumed run logs again from the iteration after its checkpoint, and a run started
        # over (--overwrite) from 1: hide what the interrupted or the earlier run had logged
        # from there on, as metrics.jsonl sets it aside (or --overwrite deletes it).
        return SummaryWriter(self.run.train.tensorboard_dir, purge_step=self.iteration + 1)

    def _load_if_asked(self, resume: bool) -> None:
        from dsmoe_megatron import checkpoint

        train = self.run.train
        source = train.save if resume else train.load
        if source is None:
            return
        ckpt = checkpoint.resolve(source)
        finetune = train.finetune and not resume
        saved = self._check_same_model(ckpt, resume)
        extra = checkpoint.load(ckpt, self.model, self.optimizer, weights_only=finetune)
        if finetune:  # iteration, samples, optimizer and lr schedule start anew
            _log(f"loaded the weights of {ckpt} (iteration {extra.get('iteration', 0)}) to "
                 "fine-tune from: iteration 0, a new optimizer")
            return
        self.iteration = int(extra.get("iteration", 0))
        self.updates = int(extra.get("updates", self.iteration))
        self.consumed_samples = int(extra.get("consumed_samples", 0))
        if "data_indexes" in extra:  # not in checkpoints of earlier versions
            self.saved_data_indexes = (ckpt, extra["data_indexes"])
        _log(f"loaded {ckpt} (iteration {self.iteration})")
        if self.iteration >= train.train_iters:  # a new run that would train nothing
            raise CheckpointError(
                f"load: {ckpt} is at iteration {self.iteration}, and train_iters="
                f"{train.train_iters} leaves nothing to train (the iteration carries over); "
                f"raise train_iters above {self.iteration}, or set finetune: true to start "
                "from its weights at iteration 0")
        # A resume without the first run's key=value overrides takes the YAML's (a checkpoint
        # at iteration 0, from-hf's, was trained with nothing).
        if saved is not None and self.iteration:
            self._report_changed_training(ckpt, saved.train, resume)
        was, now = extra.get("global_batch"), train.global_batch(self.dp_size)
        if was is not None and was != now:
            before = saved.train if saved is not None else train  # eval_iters may change too
            evaluated = before.eval_iters * was if before.eval_interval else None
            _log(f"the global batch changes from {was} to {now} samples per step"
                 + (" (global_batch_size: null follows the data-parallel size; set it to keep "
                    f"{was})" if train.global_batch_size is None else "")
                 + (f"; valid_loss now averages the first {train.eval_iters * now} "
                    "validation samples (eval_iters x global batch)"
                    + (f", where it averaged {evaluated}" if evaluated else "")
                    if train.eval_interval and evaluated != train.eval_iters * now else ""))

    def _report_changed_training(self, ckpt: Path, before, resume: bool) -> None:
        """Name what the config changes of how the checkpoint was trained: the sample stream
        a run continues (not an import's, at iteration 0) and, on resume, the training
        settings and the next step's lr (e.g. a finished cosine schedule extended)."""
        now = self.run.train
        if before.seq_length != now.seq_length:
            _log(f"seq_length changes from {before.seq_length} to {now.seq_length}: the data is "
                 "cut into other samples, so the run does not continue the sample stream it was "
                 "reading")
        if not resume:
            return
        changed = [f"{name} {getattr(before, name)} -> {getattr(now, name)}"
                   for name in _TRAINED_WITH if getattr(before, name) != getattr(now, name)]
        if changed:
            _log(f"the config changes what {ckpt} was trained with: {', '.join(changed)}; "
                 "the run continues with the new values (to keep the old ones, give the "
                 "key=value overrides the run was started with again)")
        was, lr = learning_rate(before, self.updates), learning_rate(now, self.updates)
        if not math.isclose(was, lr):
            _log(f"the lr schedule changes: the next step (iteration {self.iteration + 1}) "
                 f"trains at lr {lr:.4g}, where the checkpoint's settings give {was:.4g}")

    def _say_which_datasets_changed(self) -> None:
        """A dataset rebuilt at its prefix (``dsmoe-preprocess --force``) since the checkpoint
        keeps its data_path, so the config change note does not name it: say it here."""
        if self.saved_data_indexes is None:
            return
        ckpt, saved = self.saved_data_indexes
        changed = [prefix for prefix, digest in self.data_indexes.items()
                   if saved.get(prefix, digest) != digest]
        if changed:
            _log(f"the dataset{'s' * (len(changed) > 1)} {', '.join(changed)} changed since "
                 f"{ckpt} was saved (another .idx: rebuilt in place?): the run does not "
                 "continue the sample stream it was reading")

    def _stop_if_complete(self) -> None:
        """A chained job (sbatch --dependency=singleton) that finds the run complete ends before
        building the model and loading the checkpoint, minutes at scale."""
        from dsmoe_megatron.checkpoint import iteration_of, resolve

        train = self.run.train
        done = iteration_of(resolve(train.save)) or 0
        if done >= train.train_iters:
            raise RunComplete(f"the run is complete: iteration {done} of train_iters="
                              f"{train.train_iters}; raise train_iters to train on")

    def _check_same_model(self, ckpt: Path, resume: bool):
        """A checkpoint resumes (or starts a run: ``load``) under any layout and
        hyper-parameters, but only into the model it was saved from: name the first field of
        its run.yaml that differs. Returns the run config it was saved with (None without
        one)."""
        from dsmoe_megatron.checkpoint import model_difference, saved_run_config

        saved = saved_run_config(ckpt)
        if saved is None:
            return None  # not written by the trainer: the tensor shapes are still checked on load
        difference = model_difference(saved, self.config, self.vocab_size)
        if difference is not None:
            raise different_model(ckpt, difference, resume)
        if saved.layout != self.run.layout:
            _log(f"resharding {ckpt} from {_describe_layout(saved.layout)} to "
                 f"{_describe_layout(self.run.layout)}")
        return saved

    # ---- one step -------------------------------------------------------------------------
    def _batches(self, dataset, consumed: int):
        from dsmoe_megatron.data import iterate_batches

        def one():
            for batch in iterate_batches(dataset, self.run.train.micro_batch_size,
                                         self.run.train.seed, consumed_samples=consumed,
                                         data_parallel_rank=self.dp_rank,
                                         data_parallel_size=self.dp_size):
                self._check_token_ids(batch)
                yield {k: v.to(self.rt.device) if isinstance(v, torch.Tensor) else v
                       for k, v in batch.items()}

        if len(self.model) > 1:
            return [one() for _ in self.model]
        return one()

    def _check_token_ids(self, batch) -> None:
        """A dataset tokenized with a larger vocabulary (Megatron-LM's GPT-2 BPE, say) would
        index past the embedding: an IndexError on a CPU, a device-side assert on a GPU."""
        largest = int(torch.maximum(batch["tokens"].max(), batch["labels"].max()))
        if largest >= self.vocab_size:
            data = (f"data_path {self.run.train.data_path or '(the shipped corpus)'} holds token "
                    f"id {largest}, but vocab_size is {self.vocab_size}")
            own = imported_tokenizer(self.run.train)
            if own:  # the import's vocabulary is fixed by its weights: its tokenizer is the fix
                kept, files = own
                raise ValueError(
                    f"{data}: the data was tokenized with a larger vocabulary than the model's "
                    f"own tokenizer ({', '.join(files)} in {kept}); tokenize the text with it "
                    f"(dsmoe-preprocess --tokenizer {kept} --input FILE ... --output-prefix "
                    "PREFIX) and set data_path to its prefix")
            raise ValueError(
                f"{data}: the data was tokenized with a larger vocabulary; set vocab_size to that "
                "tokenizer's size (GPT-2's: 50257), or preprocess the text with dsmoe-preprocess "
                "for the byte-level vocabulary (259)")

    def _forward_backward(self, data_iterator, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.num_microbatches, seq_length=self.run.train.seq_length,
            micro_batch_size=self.run.train.micro_batch_size, forward_only=forward_only,
        )

    def train_step(self) -> StepStats:
        from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

        start = time.perf_counter()
        lr = learning_rate(self.run.train, self.updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            # As Megatron's lr scheduler does: biases and 1-D weights (the norms) are in groups
            # of wd_mult 0, which the optimizer alone would decay like the matrices.
            group["weight_decay"] = self.run.train.weight_decay * group["wd_mult"]
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        get_moe_metrics_tracker().clear()
        outputs = self._forward_backward(self._batches(self.train_ds, self.consumed_samples),
                                         forward_only=False)
        loss = self._reduce_loss(outputs)
        if not (math.isfinite(loss) and loss > 0.0):
            self._diverged("the loss", loss)
        updated, grad_norm, _ = self.optimizer.step()
        self.iteration += 1
        self.updates += bool(updated)
        global_batch = self.run.train.global_batch(self.dp_size)
        self.consumed_samples += global_batch
        stats = StepStats(loss, self._aux_losses(), grad_norm,
                          global_batch * self.run.train.seq_length, time.perf_counter() - start,
                          lr, updated)
        # fp16 skips a step with inf/NaN gradients itself (updated False) and lowers the scale.
        if updated and grad_norm is not None and not math.isfinite(grad_norm):
            self._diverged("the gradient norm", grad_norm, weights_changed=True, step=stats)
        return stats

    def _reduce_loss(self, outputs) -> float:
        """Token-weighted mean LM loss over micro-batches and data-parallel ranks (last stage)."""
        from megatron.core import parallel_state as ps

        total = torch.zeros(2, device=self.rt.device)
        for out in outputs:
            total += out["lm loss"].to(total.device)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            # Only the last stage has the loss: share it with every stage.
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(total, src=last, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return float(total[0] / total[1].clamp(min=1))

    def _diverged(self, what: str, value: float, weights_changed: bool = False,
                  step: StepStats | None = None) -> None:
        """Stop: ``what`` became ``value`` in the step after ``self.iteration``, or in ``step``,
        the one that took the run to it."""
        from dsmoe_megatron import checkpoint

        save = self.run.train.save
        last = checkpoint.latest_iteration(save) if save else None
        where = (f"the last good checkpoint is {checkpoint.iteration_dir(save, last)} "
                 "(untouched)" if last is not None else "no checkpoint was saved yet")
        kind = "not finite" if not math.isfinite(value) else "exactly 0, a collapse"
        raise TrainingDiverged(
            f"training stopped at iteration {self.iteration + (step is None)}: {what} became "
            f"{value} ({kind})"
            f"{'; the update was applied, nothing was saved' if weights_changed else ''}; "
            f"{where}. Lower lr, raise lr_warmup_iters or check the data, then resume from that "
            "checkpoint (hyper-parameters may change on --resume).", step)

    def _aux_losses(self) -> dict[str, float]:
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

        out = {}
        metrics = get_moe_metrics_tracker().metrics
        for name in ("device_balance_loss", "load_balancing_loss"):
            # Every rank reduces both names, recorded or not: a stage without MoE layers (all
            # dense under moe_first_k_dense) records none, and skipping the collective there
            # would hang the stages that have them. The last element counts who recorded it.
            values = torch.zeros(self.config.num_layers + 1, device=self.rt.device)
            if name in metrics:
                values[:-1] = metrics[name].values
                values[-1] = 1
            # Layers live on different stages; each value is summed over micro-batches.
            dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
            dist.all_reduce(values, group=ps.get_data_parallel_group())
            if values[-1] > 0:
                out[name] = float(values[:-1].sum()) / (self.num_microbatches * self.dp_size)
        return out

    def expert_load(self) -> list[dict]:
        """Per MoE layer: max/mean tokens per expert and the unused fraction, over the tokens
        of every rank (each routes its own) and the layers of every pipeline stage. A
        collective: every rank calls it."""
        from dsmoe_megatron.moe import DeepSeekMoE

        numbers = [i + 1 for i, moe in enumerate(self.config.moe_layer_pattern()) if moe]
        counts = torch.zeros(len(numbers), self.config.num_moe_experts or 0, dtype=torch.int64,
                             device=self.rt.device)
        for chunk in self.model:
            for module in chunk.modules():
                if isinstance(module, DeepSeekMoE):
                    load = module.take_expert_load()
                    if load is not None:
                        counts[numbers.index(module.layer_number)] += load.to(counts.device)
        # Summed over all ranks: tensor-parallel ranks without SP count the same tokens, which
        # scales a layer's counts and leaves the ratios below as they are.
        dist.all_reduce(counts)
        return [dict(layer=number, max=float(load.max()), mean=float(load.float().mean()),
                     unused=float((load == 0).float().mean()))
                for number, load in zip(numbers, counts) if load.sum() > 0]

    def _forward_only_loss(self, dataset, consumed: int, steps: int) -> float:
        """Mean loss of `steps` global batches from sample `consumed` on, in eval mode, leaving
        the training state (modes, balance-loss tracker, expert-load counters) as it was."""
        from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

        from dsmoe_megatron.moe import DeepSeekMoE

        moe = [m for chunk in self.model for m in chunk.modules() if isinstance(m, DeepSeekMoE)]
        loads = [m.expert_load for m in moe]
        for chunk in self.model:
            chunk.eval()
        try:
            with torch.no_grad():
                batches = self._batches(dataset, consumed)
                losses = [self._reduce_loss(self._forward_backward(batches, True))
                          for _ in range(steps)]
        finally:
            for chunk in self.model:
                chunk.train()
            for module, load in zip(moe, loads):
                module.expert_load = load
        get_moe_metrics_tracker().clear()
        return sum(losses) / max(1, len(losses))

    def evaluate(self) -> float:
        return self._forward_only_loss(self.valid_ds, 0, self.run.train.eval_iters)

    def _weights_finite(self) -> bool:
        finite = torch.tensor([all(bool(p.detach().isfinite().all())
                                   for chunk in self.model for p in chunk.parameters())],
                              dtype=torch.int32, device=self.rt.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def save(self) -> Path:
        """Write a checkpoint of the current weights, if they are finite and the next forward
        pass from them gives a finite loss (else stop: a named checkpoint always resumes).

        Costs one forward pass of a global batch (the next one) per save."""
        from dsmoe_megatron import checkpoint

        # Room for this checkpoint (2 TB at 145B); the save of a stop, in a scheduler's grace
        # time, goes first.
        if not self.stopped_early:
            self.deletions.wait()
        if not self._weights_finite():
            self._diverged("a weight", math.nan, weights_changed=True)
        # The batch of the next step; after the last step (no next one), the last step's.
        batch_size = self.run.train.global_batch(self.dp_size)
        last = self.iteration >= self.run.train.train_iters
        loss = self._forward_only_loss(self.train_ds, self.consumed_samples - batch_size * last, 1)
        if not math.isfinite(loss):
            self._diverged(f"the loss of the next step from iteration {self.iteration}'s "
                           "weights", loss, weights_changed=True)
        save = Path(self.run.train.save)
        run_yaml = (save / checkpoint.RUN_CONFIG_NAME).read_text() if _rank0() else None
        final = checkpoint.save(
            save, self.iteration, self.model, self.optimizer,
            extra_state={"iteration": self.iteration, "updates": self.updates,
                         "consumed_samples": self.consumed_samples,
                         "global_batch": self.run.train.global_batch(self.dp_size),
                         "data_indexes": self.data_indexes},
            run_config_yaml=run_yaml,
        )
        if self.run.train.keep_checkpoints and _rank0():
            self._prune(save, self.run.train.keep_checkpoints)
        return final

    def _prune(self, save: Path, keep: int) -> None:
        """keep_checkpoints, on rank 0: the older checkpoints are renamed at once and deleted in
        the background, so that no rank waits on the filesystem at its next collective."""
        from tqdm import tqdm  # its write keeps the progress bar whole

        from dsmoe_megatron import checkpoint

        # After the save of a stop, which did not wait, a deletion may still run: its report
        # would take the checkpoints renamed now for ones it could not delete.
        self.deletions.wait()
        try:
            checkpoint.prune_checkpoints(save, keep)
        except OSError as error:  # a week's run does not stop for an old checkpoint
            tqdm.write(describe_os_error(f"keep_checkpoints={keep}: setting an older checkpoint "
                                         "aside failed", error, save)
                       + "; training goes on, and the next save tries again")
            return
        self.deletions.start(save, f"keep_checkpoints={keep}")

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> Path | None:
        """Train to train_iters (or stop_at, or an early exit: ``stopped_early`` says why);
        returns the last checkpoint written, if any."""
        from tqdm import tqdm

        from dsmoe_megatron.early_exit import EarlyExit

        train = self.run.train
        end = min(train.train_iters, stop_at or train.train_iters)
        bar = tqdm(total=end, initial=self.iteration, disable=not _rank0(), desc="train",
                   dynamic_ncols=True, file=sys.stdout)
        saved, saved_at = None, self.iteration
        window: list[StepStats] = []
        with EarlyExit(train, self.rt.device, self.started) as early_exit:
            while self.iteration < end:
                try:
                    stats = self.train_step()
                except TrainingDiverged as err:
                    if err.step is not None:  # its record: how it diverged
                        self._log_window([*window, err.step], bar)
                    raise
                window.append(stats)
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}")
                self.stopped_early = early_exit.reason() if self.iteration < end else None
                if (self.iteration % train.log_interval == 0 or self.iteration == end
                        or self.stopped_early):
                    self._log_window(window, bar)
                    window = []
                if train.eval_interval and self.iteration % train.eval_interval == 0:
                    self._log_metrics({"valid_loss": self.evaluate()})
                if train.save and train.save_interval and self.iteration % train.save_interval == 0:
                    saved, saved_at = self.save(), self.iteration
                if self.stopped_early:
                    break
            bar.close()
            # Still within the exit handler: the signal repeated during this save is no stop.
            if train.save and saved_at != self.iteration:
                saved = self.save()
        self.deletions.wait()  # a run that stops on an error leaves them to the next start
        return saved

    def _log_window(self, window: list[StepStats], bar) -> None:
        seconds = sum(s.seconds for s in window)
        last = window[-1]
        record = {
            "lm_loss": last.loss,
            "lr": last.lr,
            "grad_norm": float(last.grad_norm) if last.grad_norm is not None else None,
            "tokens_per_s": sum(s.tokens for s in window) / max(seconds, 1e-9),
            **{name: value for name, value in last.aux.items()},
        }
        if self.run.model.fp16:  # as Megatron-LM logs them: why a loss may stand still
            record["loss_scale"] = float(self.optimizer.get_loss_scale())
            record["skipped_steps"] = sum(not s.updated for s in window)
        load = self.expert_load()
        if load:
            record["expert_load_max_over_mean"] = max(r["max"] / max(r["mean"], 1e-9) for r in load)
            record["experts_unused_fraction"] = max(r["unused"] for r in load)
        self._log_metrics(record, bar)

    def _log_metrics(self, record: dict, bar=None) -> None:
        if not _rank0():
            return
        record = {"iteration": self.iteration, **record}
        text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in record.items() if v is not None)
        (bar.write if bar is not None else print)(text)
        if self.writer is not None:
            with _naming(self.run.train.tensorboard_dir):
                for key, value in record.items():
                    if key != "iteration" and isinstance(value, (int, float)):
                        self.writer.add_scalar(key, value, self.iteration)
                self.writer.flush()
        if self.metrics_file is not None:
            with _naming(self.metrics_file.name):
                self.metrics_file.write(json.dumps(_strict_json(record)) + "\n")
                self.metrics_file.flush()


def _strict_json(record: dict) -> dict:
    """Non-finite floats as null: strict JSON (jq, most JSON libraries) has no NaN or Infinity,
    which json.dumps writes; the console and TensorBoard keep the value."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


@contextlib.contextmanager
def _naming(path):
    """A write error (a full disk) that names no file, as a buffered write's or TensorBoard's
    writer thread's, names ``path``: the message then says which file and which filesystem."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from None


def wrap_ddp(chunks, config, use_distributed_optimizer: bool, overlap_grad_reduce: bool = False,
             bucket_size: int | None = None) -> list:
    """Megatron-core DDP around each model chunk, and the config hooks its schedules call.

    With ``overlap_grad_reduce`` each bucket's reduction starts as soon as its gradients are
    ready in the backward pass (the schedules call ``grad_sync_func`` per model chunk)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=overlap_grad_reduce, bucket_size=bucket_size,
    )
    model = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]

    def per_chunk(hooks):
        return hooks if len(hooks) > 1 else hooks[0]

    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = per_chunk([m.no_sync for m in model])
    config.grad_sync_func = per_chunk([m.start_grad_sync for m in model]) \
        if overlap_grad_reduce else None
    return model


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    mask = loss_mask.float()
    loss = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    from functools import partial

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _resume_mode(text: str) -> str:
    if text not in ("auto", "always"):  # "always": what a bare --resume means
        raise argparse.ArgumentTypeError(
            f"takes no value or 'auto', not {text!r} (put key=value overrides before --resume)")
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="dsmoe-train",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("config", help="a YAML file from yaml_configs/ or your own")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value, dotted for sections "
                        "(e.g. train_iters=50 language_model.num_layers=2)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const="always", default=None, type=_resume_mode,
                       help="continue the run in `save` from its newest checkpoint (under any "
                            "layout); `--resume auto`: continue if it has one, else start")
    start.add_argument("--overwrite", action="store_true",
                       help="delete the run already in `save` and start over")
    parser.add_argument("--stop-at", type=positive_int, default=None,
                        help="stop after this iteration (the schedule still spans train_iters)")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    from dsmoe_megatron import runtime
    from dsmoe_megatron.config import ConfigError
    from dsmoe_megatron.hf.mapping import ConversionError
    from dsmoe_megatron.run_dir import unlock_save_dir
    from dsmoe_megatron.yaml_config import YamlConfigError, load_run_config

    args = parse_args(quiet_warnings(argv))
    try:
        run = load_run_config(args.config, args.overrides)
    except (ConfigError, YamlConfigError, FileNotFoundError) as error:
        print_error("dsmoe-train", error)
        return 2
    trainer = None
    started_process_group = not dist.is_initialized()  # else a caller's, which it keeps
    on_sigterm = _stop_on_sigterm()
    try:
        trainer = Trainer(run, resume=args.resume or "never", overwrite=args.overwrite)
        end = run.train.train_iters
        idle = args.stop_at is not None and args.stop_at <= trainer.iteration < end
        if idle:
            _log(f"nothing to train: the run is at iteration {trainer.iteration}, at or past "
                 f"--stop-at {args.stop_at}; raise --stop-at, or leave it out to train on to "
                 f"train_iters={end}")
        saved = trainer.fit(stop_at=args.stop_at)
        if saved is not None:
            _log(f"checkpoint saved to {saved.resolve()}")
        why = trainer.stopped_early or (
            f"--stop-at {args.stop_at}" if args.stop_at is not None and not idle
            and trainer.iteration < end else None)
        if why:
            _log(f"stopped at iteration {trainer.iteration} of {end}: {why}; "
                 + ("continue with --resume" if saved is not None else
                    "no save directory, nothing was written"))
        return 0
    except RunComplete as complete:
        _log(str(complete))
        return 0
    except (TrainingDiverged, CheckpointError, ConfigError, ConversionError, ValueError,
            FileNotFoundError) as error:
        print_error("dsmoe-train", error)
        return 1
    except OSError as error:  # a full disk, a read-only or missing directory, ...
        what = f"stopped at iteration {trainer.iteration}" if trainer is not None else "stopped"
        print_error("dsmoe-train", f"{describe_os_error(what, error, run.train.save)}; "
                                   f"{_where_to_continue(run)}")
        return 1
    except RuntimeError as error:
        # Gloo's word on a rank whose peer exited (rank 0 alone writes the logs, ...): that
        # rank printed why; this one says so in a line instead of a traceback.
        if not peer_exited(error):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        print_error("dsmoe-train", f"rank {rank} stopped: {PEER_EXITED}; "
                                   f"{_where_to_continue(run)}")
        return 1
    except KeyboardInterrupt as stop:
        if _rank0():
            print(f"dsmoe-train: {_interrupted(run, trainer, str(stop) or 'interrupted')}",
                  file=sys.stderr)
        return 143 if str(stop) else 130
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)
        if run.train.save is not None:  # a start refused while setting up leaves no trace
            unlock_save_dir(run.train.save, remove=trainer is None)
        runtime.shutdown(destroy_process_group=started_process_group)


def _quiet_tensorboard_writer_thread() -> None:
    """TensorBoard's writer thread keeps a write error (a full disk) for the next write or flush
    of the main thread, which reports it in one line, and re-raises it, so that Python printed
    the thread's traceback as well: not any more (other threads' errors are printed as before)."""
    previous = threading.excepthook
    if getattr(previous, "dsmoe", False):
        return

    def hook(args):
        if not (type(args.thread).__name__ == "_AsyncWriterThread"
                and issubclass(args.exc_type, OSError)):
            previous(args)

    hook.dsmoe = True
    threading.excepthook = hook


def _stop_on_sigterm():
    """SIGTERM (a scheduler's time limit or preemption, torchrun passing one on) stops like
    Ctrl-C: the partial save is removed and the last complete checkpoint named. Returns the
    previous handler (None off the main thread, where there is none to set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise KeyboardInterrupt("terminated (SIGTERM)")

    return signal.signal(signal.SIGTERM, stop)


def _interrupted(run, trainer, what: str = "interrupted") -> str:
    """Clean up after Ctrl-C or SIGTERM (no collectives: the other ranks may be gone) and say
    where the run can continue from."""
    from dsmoe_megatron import checkpoint

    where = f"{what} at iteration {trainer.iteration}" if trainer is not None else what
    if run.train.save is not None:
        # Renamed first: a kill during the deletion leaves a .deleting, which the next start
        # finishes, not a .partial.
        for path in checkpoint.set_aside_unfinished_saves(run.train.save):
            shutil.rmtree(path, ignore_errors=True)
    return f"{where}; {_where_to_continue(run)}"


def _where_to_continue(run) -> str:
    """The last complete checkpoint of the run and how to continue from it."""
    from dsmoe_megatron import checkpoint

    save = run.train.save
    if save is None:
        return "no save directory, nothing was written"
    try:
        last = checkpoint.latest_iteration(save)
    except (CheckpointError, OSError):
        last = None
    if last is None:
        return f"no complete checkpoint in {save}"
    return (f"the last complete checkpoint is {checkpoint.iteration_dir(save, last)} "
            "(continue with --resume)")


if __name__ == "__main__":
    sys.exit(main())
