"""dsmoe-analyze CHECKPOINT: where a model's tokens go and how much its top experts matter.

    dsmoe-analyze runs/exp1 [--out DIR] [--data-path PREFIX] [--eval-iters 16]
    dsmoe-analyze hf_model_dir                  # a Hugging Face export (converted with from-hf)

Over a fixed evaluation set (the validation split of the run's data, or ``--data-path``):

- expert load: tokens per routed expert in every MoE layer, with max/mean and unused experts;
- redundancy (the DeepSeekMoE paper's Figure 4): the validation loss when each token's p most
  probable routed experts are disabled and it is routed to the next top-K instead
  (p = 0 .. ``--max-disabled-fraction`` x routed experts); a model whose experts are less
  redundant loses more;
- the loss with the shared experts removed, and with them removed but Ks more routed experts
  activated (the paper's Sec. 4.5 test, same activated compute).

Writes ``analysis.json``, ``expert_load.png`` and ``redundancy.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from dsmoe_megatron.cli import describe_os_error, quiet_warnings, quiet_when_run_as_main

quiet_when_run_as_main(__name__)

import torch  # noqa: E402

from dsmoe_megatron.checkpoint import CheckpointError  # noqa: E402
from dsmoe_megatron.hf.mapping import ConversionError  # noqa: E402


class AnalysisError(ValueError):
    pass


OUTPUTS = ("analysis.json", "expert_load.png", "redundancy.png")
"""What the analysis writes into --out: the result, then its plots."""


@dataclass
class EvalSettings:
    eval_iters: int = 16
    micro_batch_size: int = 16
    seq_length: int | None = None
    """None: the run's."""
    data_path: list[str] | None = None
    """None: the run's data (the shipped corpus when the run has none)."""
    split: str | None = None
    """None: the run's split; the validation part is used."""


# ---------------------------------------------------------------------------------------------
# Model and data


def load_checkpoint_state(checkpoint_dir: str | Path):
    """(run config, single-rank model config, state dict) of a dist checkpoint of any layout.

    Needs a single-process runtime (``convert.single_rank_runtime``).
    """
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.convert import _resolve_checkpoint, read_checkpoint_run
    from dsmoe_megatron.hf.mapping import single_rank_config
    from dsmoe_megatron.hf.streaming import DistCheckpointReader
    from dsmoe_megatron.model import build_model

    ckpt = _resolve_checkpoint(checkpoint_dir)
    if not (ckpt / checkpoint.RUN_CONFIG_NAME).exists():  # to-hf takes the model as --config
        raise AnalysisError(
            f"{ckpt / checkpoint.RUN_CONFIG_NAME} is missing; the checkpoint does not say its "
            "model (a checkpoint of Megatron-LM's training loop?): export it with dsmoe-convert "
            f"to-hf --checkpoint {checkpoint_dir} --out HF_DIR --config YAML (the --dsmoe-yaml "
            "file it was trained with, and --set KEY=VALUE for each model flag given beside it) "
            "and analyse HF_DIR, with --data-path and --split as the run had them")
    run = read_checkpoint_run(ckpt)
    embedding = "embedding.word_embeddings.weight"
    reader = DistCheckpointReader(ckpt)
    if embedding not in reader.shapes:
        raise ConversionError(f"{ckpt} has no {embedding}; is it a model checkpoint of this "
                              "package?")
    padded_vocab = reader.shapes[embedding][0]
    cfg = single_rank_config(run.model, params_dtype=reader.dtype(embedding))
    model = build_model(cfg, padded_vocab, run.train.seq_length, pre_process=True,
                        post_process=True)
    checkpoint.load(ckpt, [model])
    return run, cfg, model.state_dict()


def load_model(checkpoint_dir: str | Path):
    """(run config, fp32 single-rank GPTModel in eval mode) from a checkpoint of any layout.

    Needs a single-process runtime (``convert.single_rank_runtime``).
    """
    from dsmoe_megatron.config import replace
    from dsmoe_megatron.model import build_model

    run, cfg, state = load_checkpoint_state(checkpoint_dir)
    if not torch.cuda.is_available():
        cfg = replace(cfg, params_dtype=torch.float32, bf16=False, fp16=False)
    padded_vocab = state["embedding.word_embeddings.weight"].shape[0]
    model = build_model(cfg, padded_vocab, run.train.seq_length, pre_process=True,
                        post_process=True)
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("_extra_state")},
                          strict=False)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return run, model.to(device).eval()


def eval_batches(run, settings: EvalSettings) -> list[dict]:
    """The first ``eval_iters`` micro-batches of the validation split (fixed by the run's seed),
    each sample once: a split holding fewer samples is evaluated whole, the last batch short."""
    from dsmoe_megatron.data import build_gpt_datasets, default_corpus_prefix, iterate_batches
    from dsmoe_megatron.tokenizer import ByteTokenizer

    data_path = settings.data_path or run.train.data_path
    if data_path is None:
        data_path = [default_corpus_prefix(tokenizer=ByteTokenizer())]
    _, valid = build_gpt_datasets(  # one pass over the split
        data_path, settings.seq_length or run.train.seq_length, run.train.seed,
        split=settings.split or run.train.split, train_samples=1,
    )
    if valid is None:
        raise AnalysisError(f"split {settings.split or run.train.split!r} has no validation "
                            "part; pass --split with a non-zero second weight (e.g. 95,5,0)")
    size = settings.micro_batch_size
    num_samples = min(settings.eval_iters * size, len(valid))
    stream = iterate_batches(valid, size, run.train.seed)
    batches = [next(stream) for _ in range(-(-num_samples // size))]
    if num_samples % size:  # past the split's end the stream starts it over
        batches[-1] = {key: None if value is None else value[:num_samples % size]
                       for key, value in batches[-1].items()}
    return batches


def moe_layers(model) -> list:
    from dsmoe_megatron.moe import DeepSeekMoE

    return [m for m in model.modules() if isinstance(m, DeepSeekMoE)]


@torch.no_grad()
def evaluate(model, batches, vocab_size: int) -> tuple[float, list[torch.Tensor]]:
    """(token-weighted LM loss, tokens per routed expert of each MoE layer) over ``batches``.

    The loss is over the real vocabulary: the padding rows of the output layer are left out
    (a model converted from Hugging Face has zeros there, which Megatron's loss would count).
    """
    device = next(model.parameters()).device
    layers = moe_layers(model)
    for layer in layers:
        layer.take_expert_load()
    loss_sum, tokens = 0.0, 0.0
    for batch in batches:
        logits = model(batch["tokens"].to(device), batch["position_ids"].to(device), None)
        losses = torch.nn.functional.cross_entropy(
            logits[..., :vocab_size].float().flatten(0, 1), batch["labels"].to(device).flatten(),
            reduction="none")
        mask = batch["loss_mask"].to(device).float().flatten()
        loss_sum += float((losses * mask).sum())
        tokens += float(mask.sum())
    loads = [layer.take_expert_load().cpu() for layer in layers]
    return loss_sum / max(tokens, 1.0), loads


# ---------------------------------------------------------------------------------------------
# Interventions


@contextlib.contextmanager
def disabled_top_experts(model, p: int):
    """Route every token past its ``p`` most probable experts, to the next top-K."""
    routers = [layer.router for layer in moe_layers(model)]
    for router in routers:
        if p + router.topk > router.num_experts:
            raise AnalysisError(f"cannot disable {p} of {router.num_experts} routed experts with "
                                f"top-{router.topk} routing")
        router.excluded_top_experts = p
    try:
        yield
    finally:
        for router in routers:
            router.excluded_top_experts = 0


@contextlib.contextmanager
def shared_experts_removed(model, extra_routed: int = 0):
    """Zero every shared-expert output; route each token to ``extra_routed`` more experts."""
    layers = [layer for layer in moe_layers(model) if layer.shared_experts is not None]
    if not layers:
        raise AnalysisError("the model has no shared experts")

    def zero(module, args, output):
        out, bias = output
        return torch.zeros_like(out), None if bias is None else torch.zeros_like(bias)

    hooks = [layer.shared_experts.register_forward_hook(zero) for layer in layers]
    for layer in layers:
        layer.router.topk += extra_routed
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            layer.router.topk -= extra_routed


# ---------------------------------------------------------------------------------------------
# The analysis


def _load_rows(loads: list[torch.Tensor], layer_numbers: list[int], k: int) -> list[dict]:
    rows = []
    for number, counts in zip(layer_numbers, loads):
        counts = counts.float()
        mean = float(counts.mean())
        rows.append(dict(layer=number, tokens_per_expert=[int(c) for c in counts],
                         fraction_of_tokens=[float(c) / float(counts.sum() / k) for c in counts],
                         max_over_mean=float(counts.max()) / mean if mean else None,
                         unused_experts=int((counts == 0).sum())))
    return rows


def analyze(model, batches, vocab_size: int, max_disabled_fraction: float = 0.25) -> dict:
    layers = moe_layers(model)
    if not layers:
        raise AnalysisError("the model has no MoE layers (a dense model): nothing to analyse")
    cfg = layers[0].config
    n, k, ks = cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_num_shared_experts

    def loss() -> float:
        return evaluate(model, batches, vocab_size)[0]

    normal, loads = evaluate(model, batches, vocab_size)
    result = {
        "model": dict(routed_experts=n, topk=k, shared_experts=ks,
                      expert_width=cfg.moe_ffn_hidden_size, moe_layers=len(layers)),
        "eval_samples": sum(len(b["tokens"]) for b in batches),
        "eval_tokens": int(sum(float(b["loss_mask"].sum()) for b in batches)),
        "loss": normal,
        "expert_load": _load_rows(loads, [layer.layer_number for layer in layers], k),
        "redundancy": [{"disabled_top": 0, "fraction_of_routed": 0.0, "loss": normal}],
    }
    for p in range(1, min(int(max_disabled_fraction * n), n - k) + 1):
        with disabled_top_experts(model, p):
            result["redundancy"].append(
                {"disabled_top": p, "fraction_of_routed": p / n, "loss": loss()})
    if ks:
        with shared_experts_removed(model):
            removed = loss()
        extra = None
        if k + ks <= n:
            with shared_experts_removed(model, extra_routed=ks):
                extra = loss()
        result["shared_removed"] = {"loss": removed, "loss_with_extra_routed": extra,
                                    "extra_routed": ks}
    return result


# ---------------------------------------------------------------------------------------------
# Plots


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def draw_expert_load(fig, ax, rows: list[dict], title: str) -> None:
    """Heatmap of the fraction of tokens each routed expert gets, one row per MoE layer."""
    grid = [r["fraction_of_tokens"] for r in rows]
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [f"layer {r['layer']}" for r in rows])
    ax.set_xlabel("routed expert")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="fraction of tokens")


def plot_expert_load(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rows, model = result["expert_load"], result["model"]
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.18 * model["routed_experts"]),
                                    1.2 + 0.45 * len(rows)))
    draw_expert_load(fig, ax, rows, "fraction of tokens routed to each expert (uniform: "
                     f"{model['topk']}/{model['routed_experts']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_redundancy(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    points = result["redundancy"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["fraction_of_routed"] for p in points], [p["loss"] for p in points], "o-",
            label="top-p routed experts disabled")
    shared = result.get("shared_removed")
    if shared:
        ax.axhline(shared["loss"], color="C3", ls="--", label="shared experts removed")
        if shared["loss_with_extra_routed"] is not None:
            ax.axhline(shared["loss_with_extra_routed"], color="C2", ls=":",
                       label=f"shared removed, +{shared['extra_routed']} routed")
    ax.set_xlabel("disabled top routed experts (fraction of routed experts)")
    ax.set_ylabel("validation loss")
    ax.set_title("redundancy among routed experts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# Command line


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "latest").exists()


def run_analysis(source: str | Path, out: Path, settings: EvalSettings,
                 max_disabled_fraction: float = 0.25) -> dict:
    """Analyse a checkpoint (or HF export) and write analysis.json and the plots into ``out``;
    without matplotlib, plots of an earlier analysis there are deleted (``result["removed"]``)."""
    source = Path(source)
    if not source.exists():
        raise AnalysisError(f"{source} does not exist; pass a checkpoint save directory, an "
                            "iter_XXXXXXX directory or a Hugging Face export")
    # Created before the evaluation, which can take minutes; removed again if that fails.
    created = _make_dirs(out)
    try:
        result = {"source": str(source), "settings": asdict(settings),
                  **_evaluate(source, settings, max_disabled_fraction)}
        try:
            text = json.dumps(result, indent=1, allow_nan=False)
        except ValueError:
            raise AnalysisError(f"{source}: the model's loss is not finite (NaN or inf) although "
                                "its weights are (an overflow); analyse an earlier checkpoint"
                                ) from None
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise
    (out / OUTPUTS[0]).write_text(text + "\n")
    written, removed = [out / OUTPUTS[0]], []
    for plot, name in zip((plot_expert_load, plot_redundancy), OUTPUTS[1:]):
        if plot(result, out / name):
            written.append(out / name)
        elif (out / name).exists():  # an earlier analysis's plot (--force): not this one's
            (out / name).unlink()
            removed.append(name)
    result["written"] = [str(p) for p in written]
    result["removed"] = removed
    return result


def _make_dirs(out: Path) -> list[Path]:
    """mkdir -p ``out``; returns the directories it created, outermost first."""
    missing = [p for p in (out, *out.parents) if not p.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AnalysisError(describe_os_error(f"cannot create --out {out}", err)) from None
    return missing


def _refuse_the_corpus_for_an_own_tokenizer(source: Path) -> None:
    """Without data of its own the analysis reads the shipped corpus, in byte-tokenizer ids:
    refused, before any import or load, for a model with a tokenizer of its own."""
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.convert import byte_corpus_mismatch, kept_source, read_hf_config

    if _is_hf_dir(source):
        directory, vocab_size = source, read_hf_config(source).get("vocab_size")
    else:
        ckpt = checkpoint.resolve(source)
        run = checkpoint.saved_run_config(ckpt)
        if run is None or run.train.data_path is not None:
            return
        vocab_size = run.train.vocab_size
        directory = kept_source(ckpt, vocab_size)
    problem = byte_corpus_mismatch(directory, vocab_size, "Without --data-path the analysis "
                                   "evaluates", str(source), "pass --data-path PREFIX")
    if problem:
        raise AnalysisError(problem)


def _evaluate(source: Path, settings: EvalSettings, max_disabled_fraction: float) -> dict:
    """The analysis of the model in ``source`` (a checkpoint or an HF export)."""
    from dsmoe_megatron.convert import import_from_hf, single_rank_runtime

    if settings.data_path is None:
        _refuse_the_corpus_for_an_own_tokenizer(source)
    with contextlib.ExitStack() as stack:
        checkpoint_dir = source
        if _is_hf_dir(source):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dsmoe-analyze-")))
            # The analysis reads its own data: the export's tokenizer files are not needed. The
            # checkpoint is gone when the analysis ends: from-hf's line naming it is left out.
            checkpoint_dir = import_from_hf(source, tmp / "checkpoint", tokenizer=False,
                                            quiet=True)
        with single_rank_runtime():
            run, model = load_model(checkpoint_dir)  # refuses NaN / inf weights
            if checkpoint_dir is not source and settings.split is None:
                # The export keeps the model only, so the loss differs from its checkpoint's.
                print(f"dsmoe-analyze: {source} carries no data settings: evaluating the "
                      f"validation part of split {run.train.split} (seed {run.train.seed}); pass "
                      "--split (and --data-path) as the run had them to compare with its "
                      "checkpoint", file=sys.stderr)
            trained = run.train.seq_length  # RoPE runs at any length, past it untrained
            if (settings.seq_length or trained) > trained:
                field = ("config.json's max_position_embeddings" if checkpoint_dir is not source
                         else "run.yaml's seq_length")
                print(f"dsmoe-analyze: note: --seq-length {settings.seq_length} is longer than "
                      f"the {trained} tokens {source} was trained on ({field}): its RoPE "
                      f"positions past {trained} were never trained, so the losses are those of "
                      "the model run past its length", file=sys.stderr)
            return analyze(model, eval_batches(run, settings), run.train.vocab_size,
                           max_disabled_fraction)


def _summary(result: dict) -> str:
    settings = result["settings"]
    asked = settings["eval_iters"] * settings["micro_batch_size"]
    whole = (f" (the whole validation split: {result['eval_samples']} samples, not the "
             f"{asked} of --eval-iters x --micro-batch-size)"
             if result["eval_samples"] < asked else "")
    lines = [f"validation loss {result['loss']:.4f} over {result['eval_tokens']} tokens{whole}"]
    for row in result["expert_load"]:
        lines.append(f"layer {row['layer']}: max/mean load {row['max_over_mean']:.2f}, "
                     f"{row['unused_experts']} unused experts")
    lines += [f"top {p['disabled_top']} disabled: loss {p['loss']:.4f}"
              for p in result["redundancy"][1:]]
    shared = result.get("shared_removed")
    if shared:
        lines.append(f"shared experts removed: loss {shared['loss']:.4f}")
    return "\n".join(lines)


def split_weights(text: str) -> str:
    """argparse type for --split: train,valid,test weights in Megatron's form, with a validation
    share (the part evaluated); Megatron reads other text as weights that divide by zero."""
    from dsmoe_megatron.yaml_config import split_shares

    shares = split_shares(text)
    if not (shares and shares[1] > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not train,valid,test weights with a "
                                         "validation share, e.g. 95,5,0")
    return text


def main(argv=None) -> int:
    from dsmoe_megatron.yaml_config import output_dir_problem

    parser = argparse.ArgumentParser(prog="dsmoe-analyze", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="save directory, iter_XXXXXXX directory or a "
                        "Hugging Face export directory")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: analysis/<checkpoint name>)")
    parser.add_argument("--force", action="store_true", help="replace an earlier analysis.json "
                        "and plots")
    parser.add_argument("--data-path", nargs="+", default=None, metavar="PREFIX",
                        help="indexed dataset prefix(es) (default: the run's data)")
    parser.add_argument("--split", type=split_weights, default=None, help="train,valid,test "
                        "weights (default: the run's); the validation part is evaluated")
    parser.add_argument("--eval-iters", type=int, default=EvalSettings.eval_iters)
    parser.add_argument("--micro-batch-size", type=int, default=EvalSettings.micro_batch_size)
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--max-disabled-fraction", type=float, default=0.25,
                        help="disable up to this fraction of the routed experts (default 0.25)")
    args = parser.parse_args(quiet_warnings(argv))
    source = Path(args.checkpoint)
    out = args.out or Path("analysis") / source.resolve().name
    kept = [name for name in OUTPUTS if (out / name).exists()]
    if kept and not args.force:
        print(f"dsmoe-analyze: {out} holds {', '.join(kept)} already; pass --force to replace "
              f"{'them' if len(kept) > 1 else 'it'} or choose another --out", file=sys.stderr)
        return 2
    for name in ("eval_iters", "micro_batch_size", "seq_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"dsmoe-analyze: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not 0 <= args.max_disabled_fraction < 1 or math.isnan(args.max_disabled_fraction):
        print("dsmoe-analyze: --max-disabled-fraction must be in [0, 1)", file=sys.stderr)
        return 2
    problem = output_dir_problem(str(out))
    if problem:
        print(f"dsmoe-analyze: --out {out}: {problem}; choose another --out", file=sys.stderr)
        return 2
    settings = EvalSettings(args.eval_iters, args.micro_batch_size, args.seq_length,
                            args.data_path, args.split)
    try:
        result = run_analysis(source, out, settings, args.max_disabled_fraction)
    except (ValueError, FileNotFoundError, CheckpointError, ConversionError) as err:
        print(f"dsmoe-analyze: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, ...
        print(f"dsmoe-analyze: {describe_os_error('stopped', err, out)}", file=sys.stderr)
        return 1
    print(_summary(result))
    print(f"wrote {', '.join(result['written'])}")
    if len(result["written"]) == 1:
        removed = result["removed"]
        print("no plots: matplotlib is not installed (pip install matplotlib)" + (
            f"; deleted the earlier analysis's {' and '.join(removed)}" if removed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
