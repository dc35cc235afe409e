"""DeepSeekMoE in Megatron-LM's training loop (``megatron.training.pretrain``).

Two ways in, both launched through this module on CPU and GPU alike::

    # 1. Megatron-LM's own pretrain_gpt.py with DeepSeekMoE layers
    python -m dsmoe_megatron.megatron_lm pretrain_gpt.py --spec dsmoe_megatron.specs \\
        megatron_lm_layer --num-experts 15 --moe-first-k-dense 1 ...
    # 2. our drop-in for pretrain_gpt.py, which also takes our YAML files
    python examples/pretrain_dsmoe_megatron_lm.py --dsmoe-yaml yaml_configs/tiny.yaml ...

(under torchrun: ``torchrun --nproc-per-node 8 -m dsmoe_megatron.megatron_lm SCRIPT.py ...``; a plain
``python`` run is a world of one: RANK, WORLD_SIZE, MASTER_ADDR/PORT default when no launcher set them).
Known-harmless third-party warnings are hidden; ``-v`` or ``DSMOE_SHOW_WARNINGS=1`` shows them.

The launcher runs SCRIPT.py as ``__main__`` after (a) ``enable_cpu_training()`` when there is no
GPU, (b) making Megatron-LM's ``parse_and_validate_args`` accept the DeepSeekMoE flags of
``add_dsmoe_args`` and ``--dsmoe-yaml``, and (c) when ``--spec`` names our layers, reporting
their balance losses in Megatron-LM's log.

``--dsmoe-yaml PATH`` turns the YAML file (yaml_config's format) into Megatron-LM flags placed
*before* the command line's, so a flag given explicitly wins over the YAML. Output paths
(save, load, save_interval, tensorboard_dir) are not taken from the YAML: pass ``--save`` etc.
A YAML value with no Megatron-LM equivalent (``lr_decay_style: step``) is an error unless the
flag it would set is given explicitly.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import enum
import os
import runpy
import signal
import sys
import threading
import time
import traceback
import types
from functools import partial

from dsmoe_megatron.cli import print_error, quiet_warnings, quiet_when_run_as_main

quiet_when_run_as_main(__name__)

import torch  # noqa: E402

# Megatron-core (and our modules built on it) are imported where used: importing them warns, and
# main() first quiets the known-harmless warnings.
from dsmoe_megatron import cpu_compat  # noqa: E402
from dsmoe_megatron.runtime import free_port  # noqa: E402
from dsmoe_megatron.tokenizer import ByteTokenizer  # noqa: E402

# Prepended to the command line on CPU (a flag given explicitly wins). The fusions are CUDA
# kernels or torch.compile, which only slows a CPU run down.
CPU_FLAGS = ("--transformer-impl", "local", "--distributed-backend", "gloo",
             "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-rope-fusion",
             "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion")
# The model build_model makes: RoPE, untied embeddings (also implied by --dsmoe-yaml).
MODEL_FLAGS = ("--position-embedding-type", "rope", "--untie-embeddings-and-output-weights")
# Our example's defaults: the byte-level tokenizer needs no files, Megatron-LM only uses its
# size (for padded_vocab_size).
EXAMPLE_FLAGS = (*MODEL_FLAGS, "--tokenizer-type", "NullTokenizer",
                 "--vocab-size", str(ByteTokenizer().vocab_size))

LAUNCHER = "dsmoe_megatron.megatron_lm"  # how its one-line errors start
_state = types.SimpleNamespace(cpu=False)


# ---------------------------------------------------------------------------------------------
# Running megatron.training on CPU


def enable_cpu_training() -> bool:
    """Let ``megatron.training`` run on CPU with gloo. Returns True if active; no-op with CUDA.

    On top of ``cpu_compat`` (CUDA tensors, streams, RNG -> CPU) this redirects:

    1. ``initialize_megatron`` as called by ``pretrain`` gets ``allow_no_cuda=True``;
    2. ``torch.cuda.device_count()`` is 1 (Megatron picks the local device modulo it);
    3. ``torch.cuda.get_device_properties()`` describes a compute capability 9.0 device
       (read when setting up TP/CP communication), and ``CUDA_DEVICE_MAX_CONNECTIONS=1``
       (which argument validation asks for with TP/CP > 1);
    4. ``CPU_FLAGS`` are prepended to the command line by ``parse_and_validate_args``;
    5. Megatron-LM's data loaders draw their workers' seed from a generator of their own
       (``_data_loader_with_own_seed``), not from the one dropout draws from on CPU.

    ``use_prebuilt_dataset_helpers()``, which GPU runs need too, is applied either way.
    """
    use_prebuilt_dataset_helpers()
    if not cpu_compat.activate():
        return False
    if not _state.cpu:
        from megatron.training import initialize, training

        training.initialize_megatron = partial(initialize.initialize_megatron, allow_no_cuda=True)
        training.build_pretraining_data_loader = _data_loader_with_own_seed(
            training.build_pretraining_data_loader)
        torch.cuda.device_count = lambda: 1
        torch.cuda.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(
            name="cpu", major=9, minor=0, total_memory=0, multi_processor_count=1)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        _state.cpu = True
    return True


def _data_loader_with_own_seed(build_loader):
    """A DataLoader draws its workers' base seed from torch's default generator each time it
    starts iterating, and Megatron-LM starts its loaders after ``--load`` has restored the RNG
    state. On a GPU dropout draws from the CUDA generator; on CPU from that default one, so a
    resumed run's dropout masks were not the uninterrupted run's."""
    from megatron.training import get_args

    def build(*args, **kwargs):
        loader = build_loader(*args, **kwargs)
        if isinstance(loader, torch.utils.data.DataLoader):
            loader.generator = torch.Generator().manual_seed(get_args().seed)
        return loader

    return build


def hook_checkpoint_loading() -> None:
    """Megatron-LM's ``load_checkpoint`` with two additions.

    1. Checkpoints of dsmoe-train and ``dsmoe-convert from-hf`` (``checkpoint.is_ours``), which
       Megatron-LM finds no tracker in and so started from random weights: given as
       ``--pretrained-checkpoint`` (with ``--load`` holding no Megatron-LM checkpoint yet), or as
       ``--load`` with ``--finetune``, the model starts from their weights, on any layout, at
       iteration 0 with a new optimizer, as Megatron-LM's own ``--finetune`` does.
    2. Resuming into torch's Adam (no TE or apex: on CPU, and on GPUs without them). Megatron
       builds the state dict to load into from Adam's per-parameter ``step``, which torch creates
       only on the first step, so ``--load`` of any checkpoint failed (``assert len(steps) ==
       1``). The state is created first, as Adam would, and the loaded step goes where this
       run's Adam keeps it (``checkpoint.adam_steps_where_kept``: torch's Adam per parameter,
       TE's / apex's FusedAdam per group), whichever Adam saved it. Loading runs without
       autograd: in fp32 the optimizer's main parameters are views of the model's, which
       Megatron's ``copy_`` into them refuses otherwise.

    Saving and loading also let a torch Adam holding no parameter on this rank (the expert one
    on a pipeline stage of dense layers only) report the others' step, as dsmoe-train does:
    Megatron's distributed optimizer asserted on the step it lacks. A save creates the state
    first too, as dsmoe-train's does: before any update was applied (an fp16 run skips its
    first steps while the loss scale comes down) there was none, and the save asserted. Saves
    not in the background collect the torch_dist writer's results in the process, as
    dsmoe-train's do: the Manager process Megatron started for them at the first save got
    torchrun's or the scheduler's SIGTERM too, and the ``--exit-signal-handler`` save after it
    failed ('Broken pipe'), losing the steps since the last checkpoint.

    A resume that pads the vocabulary to another size than the checkpoint's is refused
    (``_check_padded_vocabulary``)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.training import checkpointing, get_args, training

    from dsmoe_megatron.checkpoint import (adam_steps_where_kept,
                                           collect_write_results_in_process,
                                           create_adam_state, empty_adams_report_a_step)

    original = training.load_checkpoint
    if getattr(original, "dsmoe", False):
        return
    original_save = training.save_checkpoint

    def save_checkpoint(iteration, model, optimizer, *args, **kwargs):
        if not get_args().async_save:  # --async-save's writer process needs the Manager
            collect_write_results_in_process()
        if optimizer is not None:  # no step taken yet (fp16 skips its first ones): no state
            create_adam_state(optimizer)
        with empty_adams_report_a_step(optimizer):
            return original_save(iteration, model, optimizer, *args, **kwargs)

    training.save_checkpoint = save_checkpoint
    checkpointing.check_checkpoint_args = _check_padded_vocabulary(
        checkpointing.check_checkpoint_args)
    # --async-save --use-persistent-ckpt-worker: its writer process, and a kill at exit for it.
    PersistentAsyncCaller.async_loop = staticmethod(partial(_async_save_worker, _state.cpu,
                                                            os.getpid()))
    atexit.register(lambda: PersistentAsyncCaller._persistent_process
                    and PersistentAsyncCaller._persistent_process.kill())
    # Each --ckpt-format's way of loading the distributed optimizer's state (torch_dist:
    # fully_reshardable or dp_reshardable; torch: dp_zero).
    for kind in ("fully_reshardable", "dp_reshardable", "dp_zero"):
        name = f"load_parameter_state_from_{kind}"
        setattr(DistributedOptimizer, name, _without_adam_steps(getattr(DistributedOptimizer, name)))

    def load_checkpoint(model, optimizer, *args, **kwargs):
        source = _our_checkpoint_to_start_from(get_args())
        if source is not None:
            return _start_from_our_checkpoint(source, model, optimizer)
        if optimizer is not None:
            create_adam_state(optimizer)
        with (_one_line_errors("Megatron-LM cannot resume from --load"), torch.no_grad(),
              empty_adams_report_a_step(optimizer), adam_steps_where_kept(optimizer)):
            return original(model, optimizer, *args, **kwargs)

    load_checkpoint.dsmoe = True
    training.load_checkpoint = load_checkpoint


def _check_padded_vocabulary(check_checkpoint_args):
    """Megatron-LM's checks of a resume's arguments, and the size of the padded vocabulary.
    Megatron-LM pads it to a multiple of --make-vocab-size-divisible-by x TP and compares the
    sizes only for a --vocab-file run in the torch format: a resume on another TP size (or
    with another --make-vocab-size-divisible-by) loaded the checkpoint's embedding and output
    layer cut, or with zero rows added (its distributed checkpoints let those shapes differ), a
    model with another loss, without a word. (--finetune is not checked, as in Megatron-LM.)"""
    from megatron.training import get_args

    from dsmoe_megatron.checkpoint import CheckpointError

    def check(checkpoint_args, *args, **kwargs):
        run = get_args()
        saved, now = getattr(checkpoint_args, "padded_vocab_size", None), run.padded_vocab_size
        if None not in (saved, now) and saved != now:
            tp = run.tensor_model_parallel_size
            fix = (f"pass --make-vocab-size-divisible-by {saved // tp} (which pads it to {saved} "
                   f"under TP {tp})" if saved % tp == 0 else
                   f"resume on a TP size that divides {saved}")
            raise CheckpointError(
                f"{run.load} holds a vocabulary padded to {saved} rows and this run pads it to "
                f"{now} (--make-vocab-size-divisible-by {run.make_vocab_size_divisible_by} x "
                f"--tensor-model-parallel-size {tp}): the embedding and output layer would load "
                f"{'cut' if now < saved else 'with zero rows added'}, another model; {fix}")
        return check_checkpoint_args(checkpoint_args, *args, **kwargs)

    return check


def _async_save_worker(cpu: bool, rank_pid: int, *args, **kwargs):
    """The process that writes ``--async-save --use-persistent-ckpt-worker``'s checkpoints. It
    is started in the rank's process group, so the SIGTERM of torchrun (or a scheduler's, sent
    to every process) ended it too, and the ``--exit-signal-handler`` save handed to it never
    completed: the ranks hung until killed, losing the steps since the last checkpoint. It
    ignores SIGTERM now and ends when the rank closes or kills it (at exit), or when the rank
    dies without running its exit handlers (SIGTERM without ``--exit-signal-handler``,
    SIGKILL), where it would live on, waiting for saves. On CPU it gets the CPU shim: it
    started with ``torch.cuda.set_device(rank % torch.cuda.device_count())``, a
    ZeroDivisionError, and the rank hung at its first save."""
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_process, args=(rank_pid,), daemon=True).start()
    if cpu:
        enable_cpu_training()
    # This process imported Megatron-core afresh: async_loop is Megatron's own here.
    return PersistentAsyncCaller.async_loop(*args, **kwargs)


def _exit_with_process(pid: int) -> None:
    """End this process once process ``pid`` has ended (it is not our parent: Megatron starts
    the writer from a forkserver, so neither the parent's death signal nor getppid tells)."""
    while True:
        time.sleep(1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)


def _without_adam_steps(load_param_state):
    from dsmoe_megatron.checkpoint import adam_steps_set_aside

    def load(self, *args, **kwargs):
        with adam_steps_set_aside(self):
            return load_param_state(self, *args, **kwargs)

    return load


def _our_checkpoint_to_start_from(args) -> str | None:
    """The dsmoe checkpoint to take the weights of, as Megatron-LM picks a checkpoint: ``--load``
    if it holds one, else ``--pretrained-checkpoint`` (``_check_checkpoint_dirs`` has refused
    ``--load`` of ours without ``--finetune``)."""
    from dsmoe_megatron.checkpoint import MEGATRON_LM_TRACKER, is_ours

    if args.load and is_ours(args.load):
        return args.load
    load_has_megatron_lm = args.load and os.path.isfile(os.path.join(args.load,
                                                                     MEGATRON_LM_TRACKER))
    if args.pretrained_checkpoint and not load_has_megatron_lm and is_ours(
            args.pretrained_checkpoint):
        return args.pretrained_checkpoint
    return None


def _start_from_our_checkpoint(source: str, model, optimizer) -> tuple[int, int]:
    """Load the weights of a dsmoe checkpoint (any layout); Megatron-LM's (iteration,
    floating-point operations so far) of a fine-tuning start: (0, 0)."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_args, print_rank_0

    from dsmoe_megatron import checkpoint

    with _one_line_errors(), torch.no_grad():
        ckpt = checkpoint.resolve(source)
        _check_same_model(ckpt, get_attr_wrapped_model(model[0], "config"))
        extra = checkpoint.load(ckpt, model)
    args = get_args()
    if optimizer is not None and (args.fp16 or args.bf16):
        optimizer.reload_model_params()  # the fp32 main copies of the loaded weights
    print_rank_0(f"{LAUNCHER}: started from the weights of {ckpt} (saved "
                 f"at its iteration {extra['iteration']}): iteration 0, a new optimizer and "
                 "learning-rate schedule")
    return 0, 0


# Model fields whose Megatron-LM flag is not their name with dashes.
_MODEL_FIELD_FLAGS = {"num_moe_experts": "--num-experts", "gated_linear_unit": "--swiglu",
                      "add_bias_linear": "--disable-bias-linear",
                      "layernorm_epsilon": "--norm-epsilon"}


def _check_same_model(ckpt, config) -> None:
    """Name the first model field of the checkpoint's run.yaml that the flags set otherwise, as
    dsmoe-train does on resume: the load itself compares tensors, and a checkpoint of another
    depth or expert count was reported as damaged."""
    from megatron.training import get_tokenizer

    from dsmoe_megatron.checkpoint import CheckpointError, model_difference, saved_run_config

    saved = saved_run_config(ckpt)
    if saved is None:
        return  # the tensor shapes are still checked on load
    difference = model_difference(saved, config, get_tokenizer().vocab_size)
    if difference is not None:
        name, then, now = difference
        flag = _MODEL_FIELD_FLAGS.get(name, "--" + name.replace("_", "-"))
        raise CheckpointError(
            f"{ckpt} was saved from a different model: {name} is {then} there and {now} "
            f"here; give the flags of the model it was trained as ({flag}), or its run's "
            "--dsmoe-yaml file")


def use_prebuilt_dataset_helpers() -> None:
    """Megatron-LM runs ``make`` on the dataset helpers at start-up; the megatron-core wheel
    ships them compiled but without a Makefile, so skip the build when they import."""
    from megatron.core.datasets import utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return
    utils.compile_helpers = lambda: None


def single_process_defaults() -> None:
    """Let a plain ``python`` run act as a world of one: the torchrun variables Megatron-LM reads,
    when no launcher set them."""
    if "WORLD_SIZE" in os.environ:
        return
    defaults = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


# ---------------------------------------------------------------------------------------------
# Arguments


def add_dsmoe_args(parser):
    """extra_args_provider: the DeepSeekMoE-only flags (defaults: DSMOE_* environment variables,
    then DeepSeekMoEConfig's) and ``--dsmoe-yaml``."""
    from dsmoe_megatron.config import EXPERT_BACKENDS

    if "--dsmoe-yaml" in parser._option_string_actions:
        return parser
    group = parser.add_argument_group("DeepSeekMoE (dsmoe_megatron)")
    group.add_argument("--moe-num-shared-experts", type=int, default=None,
                       help="Ks, shared experts (default: --moe-shared-expert-intermediate-size"
                            " / --moe-ffn-hidden-size)")
    group.add_argument("--moe-first-k-dense", type=int, default=None,
                       help="the first k layers keep a dense FFN of --ffn-hidden-size")
    group.add_argument("--moe-device-balance-coeff", type=float, default=None,
                       help="a2, the device-level balance factor (default 0)")
    group.add_argument("--moe-device-groups", type=int, default=None,
                       help="D, device groups for the device-level loss (default: the EP size)")
    group.add_argument("--moe-expert-backend", choices=EXPERT_BACKENDS, default=None,
                       help="routed-expert GEMMs (default auto)")
    group.add_argument("--dsmoe-yaml", metavar="PATH", default=None,
                       help="a dsmoe_megatron YAML run config; flags given explicitly win")
    # A bare "%" in a help of Megatron-LM's ("e.g. 1.10 = 10%" of
    # --moe-paged-stash-buffer-size-factor-cuda) is a format to argparse: --help failed with a
    # ValueError traceback.
    formatter = parser._get_formatter()
    for action in parser._actions:
        try:
            formatter._expand_help(action)
        except (ValueError, TypeError, KeyError):
            action.help = action.help.replace("%", "%%")
    parser.error = _argument_error
    return parser


def _argument_error(message: str):
    """argparse's error (a flag unknown, without its value, of the wrong type) without the usage
    it prints first: Megatron-LM's is some 600 lines, above the one that says what was wrong."""
    print_error(LAUNCHER, f"{message} (--help lists the flags)")
    raise SystemExit(2)


def parse_and_validate_args(extra_args_provider=None, ignore_unknown_args=False,
                            args_defaults=None, default_flags=()):
    """Megatron-LM's ``parse_and_validate_args`` with ``add_dsmoe_args``. The command line is
    read as ``CPU_FLAGS`` (on CPU), ``default_flags``, the ``--dsmoe-yaml`` file's flags, then
    the command line itself: a later flag wins. ``--moe-first-k-dense`` is folded into
    ``args.moe_layer_freq`` so Megatron-LM's own logic sees the dense layers too."""
    from megatron.training import arguments

    from dsmoe_megatron.config import recomputes_moe_act
    from dsmoe_megatron.specs import dsmoe_settings

    # The launcher and our example both come through here before Megatron-LM reads the environment.
    single_process_defaults()

    def provider(parser):
        parser = add_dsmoe_args(parser)
        return extra_args_provider(parser) if extra_args_provider else parser

    megatron_parse = arguments.parse_and_validate_args
    megatron_parse = getattr(megatron_parse, "megatron_original", megatron_parse)
    defaults = [*(CPU_FLAGS if _state.cpu else ()), *default_flags]
    with _one_line_errors():
        argv = expand_dsmoe_yaml(sys.argv[1:], provider)
        sys.argv[1:] = [*defaults, *_layout_independent_flags(argv), *argv]
        args = megatron_parse(provider, ignore_unknown_args, args_defaults or {})
        _check_schedule(args)
        _check_checkpoint_dirs(args)
    if recomputes_moe_act(args):
        args.moe_grouped_gemm = True  # as DeepSeekMoEConfig sets it, before Megatron-LM checks it
    first_k = dsmoe_settings(args).get("moe_first_k_dense", 0)
    if first_k and args.num_experts:
        freq = args.moe_layer_freq
        pattern = freq if isinstance(freq, list) else [
            int(i % freq == 0) for i in range(args.num_layers)]
        args.moe_layer_freq = [0 if i < first_k else int(p) for i, p in enumerate(pattern)]
    return args


@contextlib.contextmanager
def _one_line_errors(megatron_check: str = "Megatron-LM refused the arguments",
                     megatron_errors: tuple[type[Exception], ...] = (AssertionError,)):
    """A bad YAML file, flag or checkpoint stops every rank with one line, not a traceback per
    rank: our config and checkpoint errors, and Megatron-LM's own checks (plain asserts, and
    ``megatron_errors``, each reported after ``megatron_check``)."""
    from dsmoe_megatron.checkpoint import CheckpointError
    from dsmoe_megatron.config import ConfigError

    try:
        yield
    except (ConfigError, CheckpointError) as error:
        print_error(LAUNCHER, error)
        raise SystemExit(2) from None
    except megatron_errors as error:
        what = str(error) or _failed_assert(error)
        print_error(LAUNCHER, f"{megatron_check}: {what}{_hint(what)}")
        raise SystemExit(2) from None


def _hint(check: str) -> str:
    if "OptimizerParamScheduler" in check:  # a resume with another --train-iters, --lr, ...
        return ("; pass --override-opt_param-scheduler to take the command line's learning-rate "
                "schedule, or --use-checkpoint-opt_param-scheduler to keep the checkpoint's")
    return ""


def _failed_assert(error: AssertionError) -> str:
    """An assert without a message, as its source line and place (``assert args.save_interval
    is not None``, arguments.py:1322): the check says what it needs."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{frame.line} ({os.path.basename(frame.filename)}:{frame.lineno})"


def _layout_independent_flags(argv: list[str]) -> list[str]:
    """With --dsmoe-yaml, checkpoints that resume on another layout as dsmoe-train's do: the
    vocabulary padded to a multiple of 1024 on every TP size (Megatron-LM: 128 x TP, so a resume
    on another TP size is refused, ``_check_padded_vocabulary``), and the optimizer state in the
    ``fully_reshardable`` format (Megatron-LM's ``dp_reshardable`` refuses another TP / PP).
    Flags given explicitly come later and win."""
    from dsmoe_megatron.model import VOCAB_PAD_MULTIPLE

    if _dsmoe_yaml_path(argv) is None:
        return []
    tp = _last_flag_value(argv, "--tensor-model-parallel-size") or "1"
    tp = int(tp) if tp.isdigit() else 0  # Megatron-LM refuses what is not a number
    flags = ["--dist-ckpt-optim-fully-reshardable"]
    if tp and VOCAB_PAD_MULTIPLE % tp == 0:
        flags += ["--make-vocab-size-divisible-by", str(VOCAB_PAD_MULTIPLE // tp)]
    return flags


def _check_schedule(args) -> None:
    """Megatron-LM asserts (deep in the scheduler, after building the model) that warm-up ends
    before the decay does."""
    from dsmoe_megatron.config import ConfigError

    decay = args.lr_decay_iters or args.train_iters
    if args.train_iters and args.lr_warmup_iters and args.lr_warmup_iters >= decay:
        raise ConfigError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay length "
            f"({'--lr-decay-iters' if args.lr_decay_iters else '--train-iters'} {decay}); lower "
            "--lr-warmup-iters (the YAML's lr_warmup_iters) or raise --train-iters")


def _check_checkpoint_dirs(args) -> None:
    """Megatron-LM finds no checkpoint in a save directory of dsmoe-train or dsmoe-convert
    from-hf (no tracker file): ``--load`` of one started from random weights, and ``--save``
    into one would write its iter_ directories among (and over) those of the run there."""
    from dsmoe_megatron.checkpoint import is_ours
    from dsmoe_megatron.config import ConfigError

    start = ("to start from its weights (iteration 0, a new optimizer), pass it as "
             "--pretrained-checkpoint with --save / --load a new directory")
    if args.save and is_ours(args.save):
        raise ConfigError(
            f"--save {args.save} holds checkpoints of dsmoe-train or dsmoe-convert, which "
            "Megatron-LM's iter_ directories would be written among and over; save to a new "
            f"directory ({start})")
    if args.load and is_ours(args.load) and not args.finetune:
        raise ConfigError(
            f"--load {args.load} holds a checkpoint of dsmoe-train or dsmoe-convert, which "
            "Megatron-LM's loop cannot resume (it would start from random weights); "
            f"{start}, or add --finetune")


def _last_flag_value(argv: list[str], flag: str) -> str | None:
    """The value argparse gives ``flag`` in ``argv`` (``--flag value`` or ``--flag=value``; the
    last one wins)."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(f"{flag}="):
            value = token.partition("=")[2]
    return value


def _dsmoe_yaml_path(argv: list[str]) -> str | None:
    return _last_flag_value(argv, "--dsmoe-yaml")


def expand_dsmoe_yaml(argv: list[str], extra_args_provider=None) -> list[str]:
    """``argv`` with the flags of its ``--dsmoe-yaml`` file (if any) put in front of it."""
    path = _dsmoe_yaml_path(argv)
    if path is None:
        return list(argv)
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    parser = (extra_args_provider or add_dsmoe_args)(parser)
    return [*yaml_to_megatron_flags(path, parser, argv), *argv]


# YAML (TransformerConfig) names whose Megatron-LM argument is called differently.
_ARG_NAMES = {
    "num_moe_experts": "num_experts",
    "virtual_pipeline_model_parallel_size": "num_virtual_stages_per_pipeline_rank",
    "num_layers_in_first_pipeline_stage": "decoder_first_pipeline_num_layers",
    "num_layers_in_last_pipeline_stage": "decoder_last_pipeline_num_layers",
    "gated_linear_unit": "swiglu",  # with silu, DeepSeekMoE's only activation
    "bias_activation_fusion": "bias_swiglu_fusion",
}
_NOT_FROM_YAML = ("save", "load", "finetune", "save_interval", "tensorboard_dir", "lr_step_decay_at",
                  "lr_step_decay_factor")


def yaml_to_megatron_flags(path: str, parser, given: list[str] = ()) -> list[str]:
    """The Megatron-LM flags for a YAML run config, except those whose argument ``given``
    (a command line) already sets."""
    from dsmoe_megatron.config import deepseek_defaults
    from dsmoe_megatron.yaml_config import YamlConfigError, load_run_config

    run = load_run_config(path, instantiate_checks=False)
    given_dests = {parser._option_string_actions[t.partition("=")[0]].dest
                   for t in given if t.partition("=")[0] in parser._option_string_actions}
    # Settings given by two keys together: the shared experts' width and count (width = count x
    # expert width), and which layers are MoE (moe_layer_freq, after moe_first_k_dense dense
    # ones). A flag giving either key replaces the file's setting, both keys.
    for setting in ({"moe_shared_expert_intermediate_size", "moe_num_shared_experts"},
                    {"moe_layer_freq", "moe_first_k_dense"}):
        if given_dests & setting:
            given_dests |= setting
    # The file's model keys and DeepSeekMoE's architecture defaults (SwiGLU, RMSNorm, no biases,
    # routing); the kernel fusions it turns off stay Megatron-LM's unless the file sets them.
    model_keys = {k for s in ("language_model", "model_parallel", "deepseekmoe")
                  for k in run.source.get(s, {})}
    model_keys |= {k for k in deepseek_defaults() if "fusion" not in k} - {"activation_func"}
    # Megatron-core's default, which dsmoe-train keeps; Megatron-LM's flag defaults to a softmax
    # in the activations' precision (bf16) where attention is not fused.
    model_keys.add("attention_softmax_in_fp32")
    values = {key: getattr(run.model, key) for key in sorted(model_keys)}
    values.update(dataclasses.asdict(run.train))
    values["exit_signal"] = signal.Signals[run.train.exit_signal]  # Megatron-LM's type
    if run.train.eval_interval is None:  # no evaluation
        values.update(eval_interval=run.train.train_iters, eval_iters=0)
    flags = list(MODEL_FLAGS)
    for key, value in values.items():
        dest = _ARG_NAMES.get(key, key)
        if key in _NOT_FROM_YAML or dest in given_dests or value is None:
            continue
        try:
            flags += _flag_for(parser, dest, value)
        except ValueError as err:
            raise YamlConfigError(f"{path}: {key}={value!r} {err}") from None
    return flags


def _flag_for(parser, dest: str, value) -> list[str]:
    actions = [a for a in parser._actions if a.dest == dest and a.option_strings]
    if not actions:
        raise ValueError("has no Megatron-LM flag; remove it or train with dsmoe-train")
    if value == actions[0].default:
        return []
    for action in actions:
        option = action.option_strings[0]
        # A float field whose flag takes an integer: rotary_base 500000.0 -> --rotary-base 500000
        if action.type is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"has no Megatron-LM equivalent ({option} takes an integer)")
            value = int(value)
        if action.nargs == 0:  # store_true / store_false
            if action.const == value:
                return [option]
            continue
        raw = value if isinstance(value, (list, tuple)) and action.nargs in ("*", "+") \
            else [value]
        items = [v.name if isinstance(v, enum.Enum) else str(v) for v in raw]
        # Choices are names, or the enum members themselves (--exit-signal: signal.Signals).
        if action.choices is not None and any(v not in action.choices and text not in
                                              action.choices for v, text in zip(raw, items)):
            raise ValueError(f"has no Megatron-LM equivalent ({option} takes "
                             f"{', '.join(map(str, action.choices))}); give {option} explicitly")
        return [option, *items]
    raise ValueError(f"cannot be set with {actions[0].option_strings[0]}")


# ---------------------------------------------------------------------------------------------
# What megatron.training.pretrain needs: model provider, forward step, datasets


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    """DeepSeekMoE GPTModel (dsmoe_megatron.model.build_model) from Megatron-LM's arguments,
    the padding rows of the vocabulary masked as in dsmoe-train (the loss is the model's over the
    tokenizer's vocabulary, as Hugging Face computes it)."""
    from megatron.training import get_args, get_tokenizer
    from megatron.training.argument_utils import core_transformer_config_from_args

    from dsmoe_megatron.config import ConfigError
    from dsmoe_megatron.model import build_model
    from dsmoe_megatron.specs import config_from_megatron

    args = get_args()
    # TransformerConfig's own checks raise ValueError.
    with _one_line_errors(megatron_errors=(AssertionError, ValueError)):
        if args.position_embedding_type != "rope" or not args.untie_embeddings_and_output_weights:
            raise ConfigError("DeepSeekMoE models use RoPE and untied embeddings: pass "
                              + " ".join(MODEL_FLAGS))
        _check_plain_rope(args)
        config = config_from_megatron(config or core_transformer_config_from_args(args))
    try:
        real_vocab_size = get_tokenizer().vocab_size
    except AssertionError:  # no tokenizer built (a caller's own set-up): nothing to mask by
        real_vocab_size = None
    return build_model(config, args.padded_vocab_size, args.max_position_embeddings,
                       pre_process, post_process, vp_stage, pg_collection,
                       real_vocab_size=real_vocab_size)


def other_rope_flags(args) -> list[str]:
    """The Megatron-LM flags in ``args`` (parsed, or kept in a checkpoint) for another RoPE than
    build_model's and the Hugging Face export's: the whole head, unscaled, of --rotary-base."""
    other = {"--rotary-percent": getattr(args, "rotary_percent", 1.0) != 1.0,
             "--use-rope-scaling": getattr(args, "use_rope_scaling", False),
             "--rotary-seq-len-interpolation-factor":
                 getattr(args, "rotary_seq_len_interpolation_factor", None)}
    return [flag for flag, differs in other.items() if differs]


def _check_plain_rope(args) -> None:
    """build_model's RoPE covers the whole head, unscaled (as the Hugging Face export does; its
    base is --rotary-base): Megatron-LM's flags for another were ignored without a word."""
    from dsmoe_megatron.config import ConfigError

    given = other_rope_flags(args)
    if given:
        raise ConfigError(f"{given[0]}: DeepSeekMoE models here use RoPE on the whole head, "
                          f"unscaled (the Hugging Face export's); remove {given[0]}")


_BATCH_DTYPES = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                 "position_ids": torch.int64}


def get_batch(data_iterator, vp_stage=None) -> dict:
    """The next micro-batch, read on tensor-parallel rank 0 and broadcast to the others;
    ``None`` values on middle pipeline stages (they take the previous stage's output)."""
    from megatron.core import mpu
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return dict.fromkeys(_BATCH_DTYPES)
    args = get_args()
    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    if mpu.get_tensor_model_parallel_rank() == 0:
        sample = next(data_iterator)
        batch = {k: sample[k].to(device=device, dtype=t) for k, t in _BATCH_DTYPES.items()}
    else:
        shape = (args.micro_batch_size, args.seq_length)
        batch = {k: torch.empty(shape, dtype=t, device=device) for k, t in _BATCH_DTYPES.items()}
    if mpu.get_tensor_model_parallel_world_size() > 1:
        for tensor in batch.values():
            torch.distributed.broadcast(tensor, mpu.get_tensor_model_parallel_src_rank(),
                                        group=mpu.get_tensor_model_parallel_group())
    return batch


def loss_func(loss_mask, output_tensor, model=None):
    """(summed token loss, token count, {"lm loss": [sum, count]}): Megatron-LM averages over
    tokens across micro-batches and data-parallel ranks."""
    mask = loss_mask.reshape(-1).float()
    loss = (output_tensor.reshape(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.float()])}


def forward_step(data_iterator, model, return_schedule_plan=False):
    """One micro-batch through the model: (per-token losses, loss_func)."""
    from megatron.core.utils import get_attr_wrapped_model

    if return_schedule_plan:
        raise NotImplementedError("--overlap-moe-expert-parallel-comm is not supported by "
                                  "DeepSeekMoE layers")
    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"], model=model)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """GPTDatasets from ``--data-path``, else the corpus shipped with dsmoe_megatron
    (preprocessed once per node into ``--data-cache-path`` or ~/.cache/dsmoe_megatron);
    byte-level tokens. Built on tensor-parallel rank 0 of the first and last pipeline stages."""
    from megatron.core import mpu
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    from dsmoe_megatron.data import build_gpt_datasets, default_corpus_prefix

    args = get_args()
    tokenizer = ByteTokenizer()
    data_path = args.data_path
    if not data_path:  # every rank calls this provider (is_distributed)
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            default_corpus_prefix(args.data_cache_path, tokenizer)
        torch.distributed.barrier()
        data_path = [default_corpus_prefix(args.data_cache_path, tokenizer)]
    train_samples, valid_samples, _ = train_val_test_num_samples
    train, valid = build_gpt_datasets(
        data_path, args.seq_length, args.seed, split=args.split or "98,2,0",
        train_samples=train_samples, valid_samples=valid_samples, tokenizer=tokenizer,
        cache_dir=args.data_cache_path,
        is_built_on_rank=lambda: mpu.get_tensor_model_parallel_rank() == 0
        and is_first_or_last_pipeline_stage(vp_stage),
    )
    return train, valid, None


train_valid_test_datasets_provider.is_distributed = True


# ---------------------------------------------------------------------------------------------
# Logging and the launcher

_MEGATRON_BALANCE_LOSSES = ("load_balancing_loss", "seq_load_balancing_loss",
                            "global_load_balancing_loss")


def log_dsmoe_balance_losses() -> None:
    """Megatron-LM's training log reports the balance losses named after its
    ``--moe-router-load-balancing-type``; report DeepSeekMoE's (``load_balancing_loss`` for
    aux_loss and seq_aux_loss, ``device_balance_loss`` when a2 > 0) instead."""
    from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

    from dsmoe_megatron.specs import dsmoe_settings

    original = MoEMetricsTracker.report
    if getattr(original, "dsmoe", False):
        return

    def report(self, *args, track_names=None, **kwargs):
        if isinstance(track_names, list):
            track_names = [n for n in track_names if n not in _MEGATRON_BALANCE_LOSSES]
            track_names.append("load_balancing_loss")
            if dsmoe_settings().get("moe_device_balance_coeff"):
                track_names.append("device_balance_loss")
        return original(self, *args, track_names=track_names, **kwargs)

    report.dsmoe = True
    MoEMetricsTracker.report = report


def _hook_megatron_arg_parsing() -> None:
    from megatron.training import arguments

    original = arguments.parse_and_validate_args
    if hasattr(original, "megatron_original"):
        return
    def hooked(*args, **kwargs):
        return parse_and_validate_args(*args, **kwargs)

    hooked.megatron_original = original
    arguments.parse_and_validate_args = hooked


def main(argv: list[str] | None = None) -> None:
    """``python -m dsmoe_megatron.megatron_lm SCRIPT.py [args]``: run a Megatron-LM training
    script (pretrain_gpt.py or ours) with the CPU shim where there is no GPU, our flags and
    ``--dsmoe-yaml`` accepted, and DeepSeekMoE's balance losses logged."""
    argv = quiet_warnings(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    # Without arguments one line on stderr, as a tool's usage error (the help went to stdout).
    script, rest = (argv[0], argv[1:]) if argv else ("", [])
    if not os.path.isfile(script):
        print_error(LAUNCHER, f"no training script{f' {script}' if script else ''} (the first "
                    "argument, e.g. Megatron-LM's pretrain_gpt.py or "
                    "examples/pretrain_dsmoe_megatron_lm.py; -h for help)")
        raise SystemExit(2)
    enable_cpu_training()
    hook_checkpoint_loading()
    _hook_megatron_arg_parsing()
    spec = rest[rest.index("--spec") + 1] if "--spec" in rest[:-1] else ""
    if spec.startswith("dsmoe_megatron") or script.endswith("pretrain_dsmoe_megatron_lm.py"):
        log_dsmoe_balance_losses()
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT.py` does
    # The script builds the model itself (--spec): a setting our layers refuse is one line too.
    with _one_line_errors(megatron_errors=()):
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
