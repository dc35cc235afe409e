"""dsmoe-train CONFIG [key=value ...] [--resume]: pretrain a DeepSeekMoE model on Megatron-core.

Single process on CPU, or under torchrun (one process per GPU). GPTModel with the DeepSeekMoE
specs, Megatron-core DDP + (distributed) optimizer, its pipeline schedules, LR warmup then the
paper's step decay (or cosine / constant), gradient clipping, bf16 on GPU / fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dsmoe_megatron.cli import quiet_warnings


class TrainingDiverged(RuntimeError):
    pass


def learning_rate(train, iteration: int) -> float:
    """Linear warmup, then step decay (x factor at each fraction of train_iters), cosine or constant."""
    if train.lr_warmup_iters and iteration < train.lr_warmup_iters:
        return train.lr * (iteration + 1) / train.lr_warmup_iters
    if train.lr_decay_style == "constant":
        return train.lr
    if train.lr_decay_style == "step":
        drops = sum(iteration >= round(f * train.train_iters) for f in train.lr_step_decay_at)
        return train.lr * train.lr_step_decay_factor ** drops
    span = max(1, train.train_iters - train.lr_warmup_iters)
    progress = min(1.0, (iteration - train.lr_warmup_iters) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class StepStats:
    loss: float
    aux: dict[str, float]
    grad_norm: float | None
    tokens: int
    seconds: float


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _log(message: str) -> None:
    if _rank0():
        print(message, flush=True)


class Trainer:
    def __init__(self, run, resume: bool = False):
        from megatron.core import parallel_state as ps

        from dsmoe_megatron import runtime
        from dsmoe_megatron.model import padded_vocab_size
        from dsmoe_megatron.tokenizer import ByteTokenizer
        from dsmoe_megatron.yaml_config import check_world_size

        self.run = run
        train = run.train
        self.rt = runtime.initialize(run.layout, seed=train.seed)
        check_world_size(run, self.rt.world_size)
        self.config = run.model
        if self.rt.device.type == "cpu" and (self.config.bf16 or self.config.fp16):
            _log("no GPU: training in fp32 (bf16/fp16 need a GPU)")
            self.config.bf16 = self.config.fp16 = False
            self.config.params_dtype = self.config.pipeline_dtype = torch.float32
        self.config.pipeline_dtype = self.config.params_dtype
        self.tokenizer = ByteTokenizer()
        self.vocab_size = train.vocab_size or self.tokenizer.vocab_size
        self.padded_vocab = padded_vocab_size(self.vocab_size, run.layout.tensor)
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.num_microbatches = train.num_microbatches(self.dp_size)
        self.model = self._build_model()
        self.optimizer = self._build_optimizer()
        self.iteration = 0
        self.consumed_samples = 0
        self._load_if_asked(resume)
        self.train_ds, self.valid_ds = self._build_data()
        self.writer = self._tensorboard()
        self.metrics_file = None
        if _rank0() and train.save:
            from dsmoe_megatron.checkpoint import RUN_CONFIG_NAME
            from dsmoe_megatron.yaml_config import dump_run_config

            Path(train.save).mkdir(parents=True, exist_ok=True)
            # The merged config beside the checkpoints; each checkpoint carries a copy.
            dump_run_config(run, Path(train.save) / RUN_CONFIG_NAME)
            self.metrics_file = open(Path(train.save) / "metrics.jsonl", "a")

    # ---- construction ---------------------------------------------------------------------
    def _build_model(self):
        from megatron.core.transformer.module import Float16Module

        from dsmoe_megatron.model import build_model_chunks

        chunks = []
        for chunk in build_model_chunks(self.config, self.padded_vocab,
                                        self.run.train.seq_length):
            chunk = chunk.to(self.rt.device)
            if self.config.bf16 or self.config.fp16:
                chunk = Float16Module(self.config, chunk)
            chunks.append(chunk)
        return wrap_ddp(chunks, self.config, self._distributed_optimizer())

    def _distributed_optimizer(self) -> bool:
        return dist.get_world_size() > 1

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        train = self.run.train
        opt_config = OptimizerConfig(
            optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
            adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
            clip_grad=train.clip_grad, bf16=self.config.bf16, fp16=self.config.fp16,
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=self._distributed_optimizer(),
        )
        return get_megatron_optimizer(opt_config, self.model)

    def _build_data(self):
        from dsmoe_megatron.data import build_gpt_datasets, default_corpus_prefix

        train = self.run.train
        data_path = train.data_path
        if data_path is None:
            cache = Path(train.save or "runs") / "data_cache"
            data_path = [default_corpus_prefix(cache, self.tokenizer)] if _rank0() else None
            if dist.is_initialized():
                holder = [data_path]
                dist.broadcast_object_list(holder, src=0)
                data_path = holder[0]
        global_batch = train.global_batch(self.dp_size)
        return build_gpt_datasets(
            data_path, train.seq_length, train.seed, split=train.split,
            train_samples=train.train_iters * global_batch,
            valid_samples=max(1, train.eval_iters) * global_batch * (
                train.train_iters // max(1, train.eval_interval or train.train_iters) + 1),
            tokenizer=self.tokenizer,
        )

    def _tensorboard(self):
        if not (_rank0() and self.run.train.tensorboard_dir):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _log("tensorboard is not installed: logging to the console and metrics.jsonl only")
            return None
        return SummaryWriter(self.run.train.tensorboard_dir)

    def _load_if_asked(self, resume: bool) -> None:
        from dsmoe_megatron import checkpoint

        train = self.run.train
        source = train.load or (train.save if resume else None)
        if source is None:
            return
        if resume and checkpoint.latest_iteration(source) is None:
            _log(f"--resume: no checkpoint in {source} yet, starting from scratch")
            return
        extra = checkpoint.load(source, self.model, self.optimizer)
        self.iteration = int(extra.get("iteration", 0))
        self.consumed_samples = int(extra.get("consumed_samples", 0))
        _log(f"loaded {checkpoint.resolve(source)} (iteration {self.iteration})")

    # ---- one step -------------------------------------------------------------------------
    def _batches(self, dataset, consumed: int):
        from dsmoe_megatron.data import iterate_batches

        def one():
            for batch in iterate_batches(dataset, self.run.train.micro_batch_size,
                                         self.run.train.seed, consumed_samples=consumed,
                                         data_parallel_rank=self.dp_rank,
                                         data_parallel_size=self.dp_size):
                yield {k: v.to(self.rt.device) if isinstance(v, torch.Tensor) else v
                       for k, v in batch.items()}

        if len(self.model) > 1:
            return [one() for _ in self.model]
        return one()

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
        lr = learning_rate(self.run.train, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        get_moe_metrics_tracker().clear()
        outputs = self._forward_backward(self._batches(self.train_ds, self.consumed_samples),
                                         forward_only=False)
        loss = self._reduce_loss(outputs)
        self._check_loss(loss)
        _, grad_norm, _ = self.optimizer.step()
        self.iteration += 1
        global_batch = self.run.train.global_batch(self.dp_size)
        self.consumed_samples += global_batch
        aux = self._aux_losses()
        return StepStats(loss, aux, grad_norm, global_batch * self.run.train.seq_length,
                         time.perf_counter() - start)

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

    def _check_loss(self, loss: float) -> None:
        if math.isfinite(loss) and loss > 0.0:
            return
        from dsmoe_megatron import checkpoint

        save = self.run.train.save
        last = checkpoint.latest_iteration(save) if save else None
        where = (f"the last good checkpoint is {checkpoint.iteration_dir(save, last)} "
                 "(untouched)" if last is not None else "no checkpoint was saved yet")
        raise TrainingDiverged(
            f"training stopped at iteration {self.iteration + 1}: the loss became {loss} "
            f"({'not finite' if not math.isfinite(loss) else 'exactly 0, a collapse'}); {where}. "
            "Lower lr, raise lr_warmup_iters or check the data, then resume from that checkpoint."
        )

    def _aux_losses(self) -> dict[str, float]:
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

        out = {}
        for name, entry in sorted(get_moe_metrics_tracker().metrics.items()):
            values = entry.values.clone()
            # Layers live on different stages; each value is summed over micro-batches.
            dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
            dist.all_reduce(values, group=ps.get_data_parallel_group())
            out[name] = float(values.sum()) / (self.num_microbatches * self.dp_size)
        return out

    def expert_load(self) -> list[dict]:
        """Per MoE layer on this rank: max/mean tokens per expert and the unused fraction."""
        from dsmoe_megatron.moe import DeepSeekMoE

        rows = []
        for chunk in self.model:
            for module in chunk.modules():
                if isinstance(module, DeepSeekMoE):
                    load = module.take_expert_load()
                    if load is None:
                        continue
                    load = load.float()
                    rows.append(dict(layer=module.layer_number, max=float(load.max()),
                                     mean=float(load.mean()),
                                     unused=float((load == 0).float().mean())))
        return rows

    def evaluate(self) -> float:
        from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker

        for chunk in self.model:
            chunk.eval()
        totals = []
        with torch.no_grad():
            batches = self._batches(self.valid_ds, 0)
            for _ in range(self.run.train.eval_iters):
                totals.append(self._reduce_loss(self._forward_backward(batches, True)))
        for chunk in self.model:
            chunk.train()
        get_moe_metrics_tracker().clear()
        return sum(totals) / max(1, len(totals))

    def save(self) -> Path:
        from dsmoe_megatron import checkpoint

        save = Path(self.run.train.save)
        run_yaml = (save / checkpoint.RUN_CONFIG_NAME).read_text() if _rank0() else None
        return checkpoint.save(
            save, self.iteration, self.model, self.optimizer,
            extra_state={"iteration": self.iteration, "consumed_samples": self.consumed_samples},
            run_config_yaml=run_yaml,
        )

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> Path | None:
        from tqdm import tqdm

        train = self.run.train
        end = min(train.train_iters, stop_at or train.train_iters)
        bar = tqdm(total=end, initial=self.iteration, disable=not _rank0(), desc="train",
                   dynamic_ncols=True, file=sys.stdout)
        saved = None
        window: list[StepStats] = []
        while self.iteration < end:
            stats = self.train_step()
            window.append(stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}")
            if self.iteration % train.log_interval == 0 or self.iteration == end:
                self._log_window(window, bar)
                window = []
            if train.eval_interval and self.iteration % train.eval_interval == 0:
                self._log_metrics({"valid_loss": self.evaluate()})
            if train.save and train.save_interval and self.iteration % train.save_interval == 0:
                saved = self.save()
        bar.close()
        if train.save and (saved is None or self.iteration % (train.save_interval or 0) != 0):
            saved = self.save()
        return saved

    def _log_window(self, window: list[StepStats], bar) -> None:
        seconds = sum(s.seconds for s in window)
        last = window[-1]
        record = {
            "lm_loss": last.loss,
            "lr": learning_rate(self.run.train, self.iteration - 1),
            "grad_norm": float(last.grad_norm) if last.grad_norm is not None else None,
            "tokens_per_s": sum(s.tokens for s in window) / max(seconds, 1e-9),
            **{name: value for name, value in last.aux.items()},
        }
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
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, self.iteration)
            self.writer.flush()
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()


def wrap_ddp(chunks, config, use_distributed_optimizer: bool) -> list:
    """Megatron-core DDP around each model chunk, and the config hooks its schedules call."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=False,
    )
    model = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="dsmoe-train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a YAML file from yaml_configs/ or your own")
    parser.add_argument("overrides", nargs="*", help="key=value, dotted for sections "
                        "(e.g. train_iters=50 language_model.num_layers=2)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in `save`")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop after this iteration (the schedule still spans train_iters)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from dsmoe_megatron import runtime
    from dsmoe_megatron.config import ConfigError
    from dsmoe_megatron.yaml_config import YamlConfigError, load_run_config

    args = parse_args(quiet_warnings(argv))
    try:
        run = load_run_config(args.config, args.overrides)
    except (ConfigError, YamlConfigError, FileNotFoundError) as error:
        print(f"dsmoe-train: {error}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(run, resume=args.resume)
        saved = trainer.fit(stop_at=args.stop_at)
        if saved is not None:
            _log(f"checkpoint saved to {saved.resolve()}")
        return 0
    except (TrainingDiverged, ConfigError, ValueError, FileNotFoundError) as error:
        print(f"dsmoe-train: {error}", file=sys.stderr)
        return 1
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2))))
    sys.exit(main())
