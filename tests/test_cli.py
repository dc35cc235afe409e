"""The command-line tools print our messages, not pages of known-harmless third-party warnings of a
CPU install; ``-v`` or DSMOE_SHOW_WARNINGS=1 shows them. ``python -m dsmoe_megatron.synthetic``
names each bad setting."""

import errno
import inspect
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "yaml_configs" / "tiny.yaml")
# What a CPU install of torch + megatron-core prints during one short dsmoe-train run.
TRAIN_WARNINGS = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "GPTModel IS DEPRECATED",
    "MimoModelConfig is experimental",
    "full scope is deprecated",
    "No CUDA runtime is found",
    "MCore's async save is deprecated",
)
# The ones dsmoe-plan's imports and config print.
PLAN_WARNINGS = ("Apex is not installed", "Transformer Engine and Apex are not installed",
                 "No CUDA runtime is found")


def run_tool(tool: str, args: list[str], **env) -> subprocess.CompletedProcess:
    """``tool`` (a console-script function of dsmoe_megatron.cli) as its console script runs it."""
    code = f"import sys; from dsmoe_megatron import cli; sys.argv[0] = 'dsmoe-{tool}'; sys.exit(cli.{tool}())"
    environ = {k: v for k, v in os.environ.items() if k != "DSMOE_SHOW_WARNINGS"}
    environ.update(OMP_NUM_THREADS="2", **env,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_hides_harmless_warnings_unless_verbose(tmp_path):
    args = [TINY, "train_iters=1", "lr_warmup_iters=0", "eval_interval=null", "log_interval=1",
            "language_model.num_layers=2", "seq_length=32", "micro_batch_size=2",
            "global_batch_size=2", "save_interval=1"]
    quiet = run_tool("train", [*args, f"save={tmp_path}/a", f"tensorboard_dir={tmp_path}/tb_a"])
    assert "checkpoint saved to" in quiet.stdout + quiet.stderr
    shown = [w for w in TRAIN_WARNINGS if w in quiet.stderr]
    assert not shown, quiet.stderr[-3000:]

    verbose = run_tool("train", ["-v", *args, f"save={tmp_path}/b", f"tensorboard_dir={tmp_path}/tb_b"])
    missing = [w for w in TRAIN_WARNINGS if w not in verbose.stderr]
    assert not missing, verbose.stderr[-3000:]


def test_environment_variable_shows_warnings():
    proc = run_tool("plan", [TINY], DSMOE_SHOW_WARNINGS="1")
    assert proc.stdout.startswith("dsmoe-plan: ") and "Parameters" in proc.stdout
    assert all(w in proc.stderr for w in PLAN_WARNINGS), proc.stderr[-3000:]


def test_ctrl_c_while_the_libraries_import_is_one_line(tmp_path):
    """Ctrl-C a second after start lands in the imports (several seconds of torch and
    Megatron-core), or on a slow machine in the training, which handles it itself: either way
    one line and exit code 130, no traceback."""
    code = "import sys; from dsmoe_megatron import cli; sys.argv[0] = 'dsmoe-train'; sys.exit(cli.train())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, TINY, "train_iters=100000", "eval_interval=null",
         f"save={tmp_path}", "tensorboard_dir=null"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("dsmoe-train: interrupted"), err[-3000:]


def test_ctrl_c_is_not_lost_to_a_library_that_catches_it_while_importing(tmp_path):
    """Some libraries catch exceptions around their optional imports (torch's numpy probe): a
    Ctrl-C raised in there was dropped (training went on) or left numpy half-imported (a
    RecursionError traceback). A stand-in tool module catches KeyboardInterrupt as they do."""
    (tmp_path / "catching_tool.py").write_text(
        "import sys, time\n"
        "print('importing', flush=True)\n"
        "try:\n    time.sleep(30)\nexcept BaseException:\n    pass\n"
        "def main():\n    print('trained', flush=True)\n    return 0\n")
    code = ("import sys, dsmoe_megatron; from dsmoe_megatron import cli; "
            f"dsmoe_megatron.__path__.append({str(tmp_path)!r}); "
            "sys.exit(cli._run('dsmoe-train', 'catching_tool'))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "importing\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "trained" not in out, (out, err)
    assert err.strip() == "dsmoe-train: interrupted", err


@pytest.mark.parametrize("tool", [
    ["-c", "import sys; from dsmoe_megatron import cli; sys.argv[0] = 'dsmoe-plan'; sys.exit(cli.plan())"],
    ["-m", "dsmoe_megatron.plan"]])  # printed a BrokenPipeError traceback
def test_a_reader_that_leaves_early_is_no_traceback(tool):
    """``dsmoe-plan ... | head``: the output's reader gone before the tool prints."""
    proc = subprocess.Popen(
        [sys.executable, *tool, TINY], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    proc.stdout.close()  # long before the imports are done
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and "Traceback" not in err and "Exception" not in err, err[-3000:]


def test_a_broken_pipe_that_is_not_stdout_is_not_silenced(monkeypatch):
    """A BrokenPipeError from another pipe (the results queue of a process that died) was taken
    for `| head` leaving: the tool exited 141 without a word."""
    from dsmoe_megatron import cli, plan

    def lost_peer():
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(plan, "main", lost_peer)
    with pytest.raises(BrokenPipeError):
        cli.plan()


@pytest.mark.parametrize("module", ["data", "synthetic", "train"])
def test_ctrl_c_at_the_start_of_python_m_is_one_line(module, tmp_path):
    """``python -m dsmoe_megatron.X`` runs as the console scripts do: Ctrl-C while the libraries
    import printed a KeyboardInterrupt traceback (or, inside torch's import, aborted)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a fable of a fox and a crow\n" * 200_000)  # seconds of work after the imports
    args = {"data": ["--input", str(corpus), "--output-prefix", str(tmp_path / "a")],
            "synthetic": ["--output-prefix", str(tmp_path / "s"), "--tokens", "1e8"],
            "train": [str(ROOT / "yaml_configs" / "tiny.yaml"), f"save={tmp_path / 't'}"]}[module]
    proc = subprocess.Popen(
        [sys.executable, "-m", f"dsmoe_megatron.{module}", *args], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    name = {"data": "dsmoe-preprocess", "synthetic": "dsmoe_megatron.synthetic",
            "train": "dsmoe-train"}[module]
    # dsmoe-train, if already past its imports, also says what it left ("interrupted at ...")
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1 and err.startswith(
        f"{name}: interrupted"), err[-3000:]


@pytest.mark.parametrize("module", ["train", "convert", "analyze", "plan", "data"])
def test_python_m_hides_harmless_warnings(module):
    """``python -m dsmoe_megatron.X`` (as torchrun -m runs them) filters before its imports warn."""
    environ = {k: v for k, v in os.environ.items() if k != "DSMOE_SHOW_WARNINGS"}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", f"dsmoe_megatron.{module}", "-h"], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-3000:]
    assert not [w for w in TRAIN_WARNINGS if w in proc.stderr], proc.stderr[-3000:]


def test_quick_start_hides_harmless_warnings(tmp_path):
    """What ``bash bootstrap.sh train`` runs."""
    environ = {k: v for k, v in os.environ.items() if k != "DSMOE_SHOW_WARNINGS"}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.quickstart", "train_iters=1", "lr_warmup_iters=0",
         "eval_interval=null", f"save={tmp_path}", "tensorboard_dir=null"], cwd=ROOT, env=environ,
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "checkpoint saved to" in proc.stdout, proc.stderr[-3000:]
    assert not [w for w in TRAIN_WARNINGS if w in proc.stderr], proc.stderr[-3000:]


def test_console_scripts_quiet_warnings_before_importing_the_tool():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"dsmoe-train": "dsmoe_megatron.cli:train",
                       "dsmoe-convert": "dsmoe_megatron.cli:convert",
                       "dsmoe-plan": "dsmoe_megatron.cli:plan",
                       "dsmoe-preprocess": "dsmoe_megatron.cli:preprocess",
                       "dsmoe-analyze": "dsmoe_megatron.cli:analyze"}


def test_preprocess_hides_megatrons_unknown_rank_warning(tmp_path):
    corpus = ROOT / "dsmoe_megatron" / "corpus" / "aesop_fables.txt"
    proc = run_tool("preprocess", ["--input", str(corpus), "--output-prefix", str(tmp_path / "a")])
    assert "wrote" in proc.stdout and "Could not determine rank" not in proc.stderr, proc.stderr


def test_preprocess_with_the_tokenizer_from_hf_is_silent_about_its_model_config(tmp_path):
    # SAVE/hf_source holds the model's config.json beside the tokenizer; transformers reads it as
    # a generic config (its remote code is not there) and warns about the model type and the
    # config's rope_scaling, neither of which the tokenizer uses.
    from dsmoe_megatron.tokenizer import write_hf_tokenizer

    write_hf_tokenizer(tmp_path / "hf_source")
    (tmp_path / "hf_source" / "config.json").write_text(
        '{"model_type": "deepseek", "rope_scaling": null, '
        '"auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig"}}')
    corpus = ROOT / "dsmoe_megatron" / "corpus" / "aesop_fables.txt"
    proc = run_tool("preprocess", ["--tokenizer", str(tmp_path / "hf_source"), "--input",
                                   str(corpus), "--output-prefix", str(tmp_path / "a")])
    assert "wrote" in proc.stdout, proc.stderr
    assert "model of type" not in proc.stderr and "rope_scaling" not in proc.stderr, proc.stderr


def test_plan_hides_the_fp32_routing_advice_our_router_does_not_need():
    # Megatron's advice is about its own router's moe_router_dtype; ours computes the logits and
    # the softmax in fp32 whatever the parameters' dtype (router.py), so it does not apply.
    from dsmoe_megatron.router import TopKRouter

    assert "torch.float32" in inspect.getsource(TopKRouter.forward)
    proc = run_tool("plan", [str(ROOT / "yaml_configs" / "deepseekmoe_16b.yaml")])
    assert "Parameters" in proc.stdout and "fp32 routing" not in proc.stderr, proc.stderr


def test_plan_hides_the_sequence_parallel_advice_our_block_does_not_need():
    # Megatron's dispatchers need sequence parallelism under TP x EP; our block splits the tokens
    # over the TP ranks itself, and the TP2 x EP2 run without it matches one rank (test_resume).
    from resume_cases import LAYOUTS

    assert "model_parallel.sequence_parallel=true" not in LAYOUTS["TP2xEP2"]
    proc = run_tool("plan", [str(ROOT / "yaml_configs" / "deepseekmoe_16b.yaml"), "--gpus", "64",
                             "model_parallel.tensor_model_parallel_size=2",
                             "model_parallel.expert_model_parallel_size=4"])
    assert "Parameters" in proc.stdout and "sequence parallelism" not in proc.stderr, proc.stderr


# ---- python -m dsmoe_megatron.synthetic ------------------------------------------------------

def synthetic(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the synthetic corpus command, run in this process."""
    from dsmoe_megatron.synthetic import main

    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors and --help
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("args, message", [
    (["--lexicons", "0"], "dsmoe_megatron.synthetic: synthetic language: lexicons must be 1..8"),
    (["--lexicons", "-3"], "dsmoe_megatron.synthetic: synthetic language: lexicons must be 1..8"),
    (["--words-per-class", "0"],
     "dsmoe_megatron.synthetic: synthetic language: words_per_class must be 1.."),
    (["--tokens", "0"], "error: argument --tokens: must be a number >= 1 (e.g. 3e6), got '0'"),
    (["--tokens", "-5"], "error: argument --tokens: must be a number >= 1"),
    (["--tokens", "nan"], "error: argument --tokens: must be a number >= 1"),
    (["--zipf", "-1"], "dsmoe_megatron.synthetic: synthetic language: zipf must be >= 0"),
], ids=["lexicons-0", "lexicons-negative", "words-0", "tokens-0",
        "tokens-negative", "tokens-nan", "zipf-negative"])
def test_synthetic_refuses_bad_settings_by_name(tmp_path, capsys, args, message):
    code, _, err = synthetic(["--output-prefix", str(tmp_path / "c"), "--tokens", "2000", *args],
                             capsys)
    # argparse's errors exit with 2; the language's with 1 (tests/test_compare.py)
    assert code == (2 if "--tokens" in args else 1) and message in err.splitlines()[-1], err
    assert not list(tmp_path.iterdir())


def test_synthetic_output_prefix_must_name_a_corpus(tmp_path, capsys, monkeypatch):
    """--output-prefix data/ wrote ./data.bin, .idx and .synthetic.json (Path() drops the
    slash); dsmoe-preprocess refuses it, and so does this."""
    monkeypatch.chdir(tmp_path)
    code, _, err = synthetic(["--output-prefix", "data/", "--tokens", "2000"], capsys)
    assert code == 1 and "--output-prefix 'data/' names a directory; add the dataset's name" in err
    assert not list(tmp_path.iterdir())


def test_synthetic_language_refuses_more_words_than_it_can_spell():
    from dsmoe_megatron.synthetic import LanguageConfig, SyntheticLanguage

    # 8 lexicons spell with 2 consonants and 3 vowels each: 2 or 3 syllables, maybe a final
    # consonant, 756 words; 3 classes of 300 would make the generator search for ever.
    spellable = sum((2 * 3) ** n * (1 + 2) for n in (2, 3))
    assert spellable == 756
    with pytest.raises(ValueError, match=r"words_per_class must be 1\.\.126 with 8 lexicon"):
        LanguageConfig(lexicons=8, words_per_class=300).check()
    language = SyntheticLanguage(LanguageConfig(lexicons=8, words_per_class=126))  # half of them
    assert all(len(set(words)) == 126 for lex in language.lexicons for words in lex.words.values())


def test_synthetic_options_have_help_and_force_replaces_a_corpus(tmp_path, capsys):
    code, out, _ = synthetic(["--help"], capsys)
    options = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    assert code == 0 and len(options) == 12  # --output-prefix, --tokens, --force, 9 language
    # each option is followed by its description (on its line or the next)
    described = re.findall(r"^  (--[\w-]+)(?: [A-Z_]+)?(?:  +\S|\n {20,}\S)", out, re.M)
    assert described == options, out
    assert "--zipf ZIPF           exponent of the Zipfian word frequencies, >= 0" in out
    args = ["--output-prefix", str(tmp_path / "c"), "--tokens", "2000"]
    assert synthetic(args, capsys)[0] == 0
    code, _, err = synthetic(args, capsys)
    assert code == 1 and "already exists; pass --force" in err
    assert synthetic([*args, "--force"], capsys)[0] == 0


def test_synthetic_hides_harmless_warnings(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != "DSMOE_SHOW_WARNINGS"}
    proc = subprocess.run([sys.executable, "-m", "dsmoe_megatron.synthetic", "--output-prefix",
                           str(tmp_path / "c"), "--tokens", "2000"], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr
    assert "Transformer Engine and Apex are not installed" not in proc.stderr, proc.stderr


def test_a_failure_without_a_message_is_described_by_its_kind():
    """A writer process that died with EOFError() (no text) made the one-line report itself
    fail with an IndexError."""
    from dsmoe_megatron.cli import describe_os_error

    failure = RuntimeError("the checkpoint writer failed")
    failure.__cause__ = EOFError()
    assert describe_os_error("saving iteration 2 failed", failure) == (
        "saving iteration 2 failed: EOFError")


def test_an_error_is_one_write_so_that_ranks_do_not_run_together(monkeypatch):
    """Under torchrun every rank prints its error to the same stream; print() wrote the newline
    apart, and two ranks' lines came out as one."""
    from dsmoe_megatron.cli import print_error

    writes = []

    class Stream:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Stream())
    print_error("dsmoe-train", "runs/x already holds a run")
    assert writes == ["dsmoe-train: runs/x already holds a run\n"]


def test_tensor_parallel_runs_on_a_cpu_hide_the_cuda_connections_advice():
    """Every TP2 or sequence-parallel run on a CPU printed Megatron's advice to set
    CUDA_DEVICE_MAX_CONNECTIONS for GPU speed (runtime.initialize sets it on GPUs)."""
    import warnings

    from megatron.core.tensor_parallel import layers

    from dsmoe_megatron.cli import quiet_warnings

    source = inspect.getsource(layers.linear_with_grad_accumulation_and_async_allreduce)
    advice = ["".join(re.findall(r'"([^"]*)"', m)) for m in
              re.findall(r'warnings\.warn\(((?:\s*"[^"]*")+)\s*\)', source)]
    assert len(advice) == 2 and all("CUDA_DEVICE_MAX_CONNECTIONS" in a for a in advice), advice
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings([])
        for message in advice:
            warnings.warn(message)
    assert not caught, [str(w.message) for w in caught]


def test_only_a_failed_save_is_taken_for_a_full_disk(monkeypatch, tmp_path):
    """A failure that names no OSError met with under 1 MiB free was said to be a full disk
    wherever it came from: dsmoe-convert's damaged checkpoint (read, not written) as well as
    Megatron's checkpoint writer, which names no OSError for a full disk."""
    import shutil
    from types import SimpleNamespace

    from dsmoe_megatron.checkpoint import CheckpointError
    from dsmoe_megatron.cli import describe_os_error

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    damaged = CheckpointError("the checkpoint is damaged: a tensor's data does not match")
    assert describe_os_error("to-hf stopped", damaged, tmp_path) == (
        f"to-hf stopped: {damaged}; 0 MiB free on the filesystem of {tmp_path}")


def test_a_connection_reset_of_a_file_is_not_a_peer_that_exited():
    """Gloo says 'Connection reset by peer' in a RuntimeError when another rank's process went
    away; the same words in an OSError (a save to a network share) are the file's error, also
    where the checkpoint writer repeats them in its own errors."""
    from torch.distributed.checkpoint.api import CheckpointException

    from dsmoe_megatron.cli import peer_exited

    gloo = RuntimeError("[pair.cc:545] Read error: Connection reset by peer.")
    assert peer_exited(gloo)
    reset = ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
    assert not peer_exited(reset)
    # as a failed save reports it: Megatron's writer repeats it in a RuntimeError, whose cause
    # is lost when torch gathers the ranks' failures into a CheckpointException
    try:
        raise RuntimeError(f"Worker failure: {reset}") from reset
    except RuntimeError as worker:
        assert not peer_exited(worker)
        gathered = RuntimeError(str(worker))
    for failure in (reset, gathered):
        assert not peer_exited(CheckpointException("write", {0: (failure, None)}))
    assert peer_exited(CheckpointException("write", {0: (gloo, None)}))
