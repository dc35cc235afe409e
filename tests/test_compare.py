"""The synthetic corpus and the statistics of examples/compare_baselines.py."""

import functools
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

from dsmoe_megatron.synthetic import (
    LEXICON_CONSONANTS,
    LanguageConfig,
    SyntheticLanguage,
    main as synthetic_main,
    metadata_path,
    split_stats,
    write_corpus,
)

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def load_compare():
    spec = importlib.util.spec_from_file_location("compare_baselines",
                                                  ROOT / "examples" / "compare_baselines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_corpus_is_deterministic_and_seeded(tmp_path):
    small = LanguageConfig(words_per_class=8)
    a = write_corpus(tmp_path / "a", 20_000, small)
    b = write_corpus(tmp_path / "b", 20_000, small)
    c = write_corpus(tmp_path / "c", 20_000, LanguageConfig(words_per_class=8, seed=1))
    data = {p: Path(f"{p}.bin").read_bytes() for p in (a, b, c)}
    assert data[a] == data[b] and data[a] != data[c]
    meta = json.loads(metadata_path(a).read_text())
    assert meta["num_tokens"] == sum(meta["documents"]["tokens"]) >= 20_000
    assert len(data[a]) == 2 * meta["num_tokens"]  # uint16 tokens: bytes + one EOD per document
    stats = split_stats(a, "90,10,0")
    assert stats["train"]["tokens"] + stats["valid"]["tokens"] == meta["num_tokens"]
    # The generator's own loss is a real entropy: positive, far below a uniform byte's.
    assert 0 < meta["entropy_nats_per_token"] < math.log(256) / 4


def test_each_lexicon_writes_with_its_own_consonants():
    language = SyntheticLanguage(LanguageConfig(words_per_class=16))
    share = len(LEXICON_CONSONANTS) // len(language.lexicons)
    for i, lexicon in enumerate(language.lexicons):
        own = set(LEXICON_CONSONANTS[i * share:(i + 1) * share])
        others = set(LEXICON_CONSONANTS) - own
        words = [w for words in lexicon.words.values() for w in words]
        assert len(set(words)) == len(words)  # no word in two classes
        assert all(set(w) & own and not set(w) & others for w in words)
    rng = random.Random(0)
    for _ in range(20):
        text, domain, nll = language.document(rng)
        lexicon, grammar = language.domains[domain]
        assert text.endswith(language.grammars[grammar].terminator)
        assert nll > 0


def test_t_quantile_matches_tables():
    compare = load_compare()
    # Two-sided 95% critical values from any t table.
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)):
        assert compare.t_quantile(0.975, df) == pytest.approx(value, abs=2e-3)


def test_paired_difference_by_hand():
    compare = load_compare()
    a, b = [1.0, 1.2, 1.1], [1.1, 1.35, 1.3]  # differences -0.1, -0.15, -0.2
    result = compare.paired_difference(a, b)
    half = 4.303 * 0.05 / math.sqrt(3)  # t(0.975, 2) x sample std of the differences / sqrt(n)
    assert result["mean"] == pytest.approx(-0.15)
    assert result["ci95"] == pytest.approx([-0.15 - half, -0.15 + half], abs=1e-4)
    assert result["significant"] and result["a_better_in"] == 3
    noisy = compare.paired_difference([1.0, 1.2, 1.1], [1.1, 1.1, 1.15])
    assert not noisy["significant"] and noisy["a_better_in"] == 2


def test_flatness_by_hand():
    compare = load_compare()
    # Last quarter of 800 steps: from the value at 600 to the one at 800.
    curves = [[(200, 2.0), (400, 1.2), (600, 1.05), (800, 1.0)],   # drop 0.05 of 1.0
              [(200, 3.0), (400, 2.0), (600, 1.3), (800, 1.0)]]    # drop 0.3 of 2.0
    flat = compare.flatness(curves)
    assert flat["drop"] == pytest.approx((0.05 + 0.3) / 2)
    assert flat["share_of_whole_drop"] == pytest.approx((0.05 + 0.15) / 2)


def test_language_settings_are_checked(capsys):
    compare = load_compare()
    assert compare.parse_args([]).language == LanguageConfig(words_per_class=16)
    args = compare.parse_args(["--language-words-per-class", "32", "--language-zipf", "0.5"])
    assert args.language == LanguageConfig(words_per_class=32, zipf=0.5)
    for bad, named in ((["--language-zipf", "high"], "--language-zipf"),
                       (["--language-words-per-class", "2"], "successors")):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)
        assert named in capsys.readouterr().err


def test_a_seed_given_twice_is_refused(capsys):
    """It would be the same run counted as two seeds in the paired t-intervals."""
    compare = load_compare()
    with pytest.raises(SystemExit):
        compare.parse_args(["--seeds", "11", "22", "11"])
    assert "--seeds: 11 given more than once" in capsys.readouterr().err


def test_synthetic_command_writes_the_language_its_options_name(tmp_path, capsys):
    assert synthetic_main(["--output-prefix", str(tmp_path / "cli"), "--tokens", "2e4",
                           "--words-per-class", "8"]) == 0
    direct = write_corpus(tmp_path / "direct", 20_000, LanguageConfig(words_per_class=8))
    assert Path(f"{tmp_path / 'cli'}.bin").read_bytes() == Path(f"{direct}.bin").read_bytes()
    assert synthetic_main(["--output-prefix", str(tmp_path / "bad"), "--tokens", "2e4",
                           "--words-per-class", "2"]) == 1
    assert "successors" in capsys.readouterr().err


def test_a_run_command_starts_in_an_empty_directory_and_continues_a_stopped_run(tmp_path,
                                                                              monkeypatch):
    """The command compare_baselines gives dsmoe-train must start a new run and resume an
    interrupted one (its 'interrupted runs resume' promise), with train's own parser and
    run-directory rules."""
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.run_dir import decide_resume
    from dsmoe_megatron.train import parse_args

    compare = load_compare()
    monkeypatch.setattr(compare, "RUNS", tmp_path)
    model = compare.Model("gshard", "GShard")
    command = compare._command(model, 11, "data/prefix", ["train_iters=4"])
    args = parse_args(command[3:])  # after python -m dsmoe_megatron.train
    save = compare.run_dir(model, 11)
    assert f"save={save}" in args.overrides and not args.overwrite
    save.mkdir()
    (save / "train.log").write_text("the log the runner opened before starting\n")
    assert decide_resume(str(save), args.resume or "never", args.overwrite) == (False, [])
    (save / checkpoint.LATEST_NAME).write_text("2")
    assert decide_resume(str(save), args.resume or "never", args.overwrite) == (True, [])


def test_a_run_trained_with_other_settings_is_neither_reused_nor_resumed(tmp_path, monkeypatch):
    """A finished run would be reported under the settings of the current command, and an
    interrupted one resumed under them: both are refused, naming what changed."""
    from dsmoe_megatron.checkpoint import RUN_CONFIG_NAME
    from dsmoe_megatron.yaml_config import dump_run_config, load_run_config

    compare = load_compare()
    monkeypatch.setattr(compare, "RUNS", tmp_path)
    model = compare.Model("gshard", "GShard", ["language_model.moe_router_topk=2"])
    before = ["train_iters=4", "lr_warmup_iters=1"]
    assert compare.settings_changed(model, 11, "data/a", before) is None  # no run yet
    dump_run_config(load_run_config(compare.BASE_CONFIG, compare._train_overrides(
        model, 11, "data/a", before), instantiate_checks=False),
        compare.run_dir(model, 11) / RUN_CONFIG_NAME)
    assert compare.settings_changed(model, 11, "data/a", before) is None
    assert compare.settings_changed(model, 11, "data/a", [*before, "lr=0.03"]) == (
        "lr: 0.004 there, 0.03 now")
    assert "data_path" in compare.settings_changed(model, 11, "data/b", before)

    monkeypatch.setattr(compare, "run_jobs", lambda *a: pytest.fail("a run was started"))
    run = load_run_config(compare.BASE_CONFIG, before, instantiate_checks=False)
    with pytest.raises(SystemExit, match=r"gshard_s11 holds a run with other settings \(lr: "):
        compare.train_all(run, [model], [11], "data/a", [*before, "lr=0.03"], 1)


def test_earlier_results_are_not_replaced_without_force(tmp_path, monkeypatch):
    """Checked before any data or training: a comparison (even a typo'd quick one) would
    otherwise write over the results of an earlier one, the recorded ones by default."""
    compare = load_compare()
    monkeypatch.setattr(compare, "corpus_prefix", lambda *a: pytest.fail("data was generated"))
    (tmp_path / "paper_ablation.json").write_text("{}\n")
    for extra in ([], ["--measure"]):
        (tmp_path / compare.COST_FILE).write_text("{}\n")
        with pytest.raises(SystemExit, match="holds the results of an earlier comparison "
                           r"\(paper_ablation(_cost)?.json\); pass --force"):
            compare.main(["--runs", str(tmp_path / "runs"), "--results", str(tmp_path), *extra])
    assert (tmp_path / "paper_ablation.json").read_text() == "{}\n"
    # --force goes on (here to the data, which this test stops at).
    with pytest.raises(pytest.fail.Exception, match="data was generated"):
        compare.main(["--runs", str(tmp_path / "runs"), "--results", str(tmp_path), "--force"])


def test_bad_options_and_paths_stop_with_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    compare = load_compare()
    from dsmoe_megatron.yaml_config import load_run_config

    run = load_run_config(compare.BASE_CONFIG, [], instantiate_checks=False)
    assert [m.key for m in compare.models(run)] == list(compare.MODEL_KEYS)
    for bad, named in ((["--models", "gshrd"], "--models: invalid choice: 'gshrd'"),
                       (["--jobs", "0"], "--jobs: must be a positive integer (1, 2, ...)"),
                       (["--analysis-eval-iters", "0"], "--analysis-eval-iters: must be")):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)
        assert named in capsys.readouterr().err

    monkeypatch.setattr(compare, "corpus_prefix", lambda *a: pytest.fail("data was generated"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    runs, results = ["--runs", str(tmp_path / "runs")], ["--results", str(tmp_path / "results")]
    for argv, message in (
            ([*runs, "--results", str(a_file)], f"--results {a_file}: is a file, not a directory"),
            (["--runs", str(a_file / "x"), *results], f"{a_file} is a file, so no directory"),
            (["train_iters=4", *runs, *results], "lr_warmup_iters: must be between 0 and "
                                                 "train_iters=4 (got 50)"),
            (["train_iters=1650", *runs, *results], "eval_interval=100 must divide "
                                                    "train_iters=1650"),
            (["eval_interval=null", *runs, *results], "eval_interval=None must divide"),
            (["train_iters=100", *runs, *results], "eval_interval=100 leaves one evaluation "
                                                   "in train_iters=100"),
            ([*runs, *results, "--data-path", str(tmp_path / "none")],
             f"--data-path: indexed dataset file {tmp_path / 'none'}.idx not found")):
        with pytest.raises(SystemExit) as stop:
            compare.main(argv)
        assert str(stop.value).startswith("compare_baselines: ") and message in str(stop.value)


def test_measure_runs_again_over_its_own_timing_runs(tmp_path, monkeypatch):
    """A second --measure found the first one's timing runs in its save directories, which
    dsmoe-train refuses to start in (a CalledProcessError with the output discarded)."""
    import subprocess

    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.run_dir import decide_resume
    from dsmoe_megatron.train import parse_args
    from dsmoe_megatron.yaml_config import load_run_config

    compare = load_compare()
    monkeypatch.setattr(compare, "RUNS", tmp_path)
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0 if len(commands) == 1 else 1)

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    run = load_run_config(compare.BASE_CONFIG, [], instantiate_checks=False)
    model = compare.Model("gshard", "GShard")
    with pytest.raises(SystemExit, match=r"measuring gshard failed; see .*gshard_40\.log"):
        compare.measure(run, [model], "data/prefix", [], [11], 10, 40)
    args = parse_args(commands[0][3:])
    save = tmp_path / "measure" / "gshard_10"
    assert f"save={save}" in args.overrides
    save.mkdir(parents=True)
    (save / checkpoint.LATEST_NAME).write_text("10")
    assert decide_resume(str(save), args.resume or "never", args.overwrite) == (
        False, [save / checkpoint.LATEST_NAME])


def test_an_analysis_over_other_batches_is_redone(tmp_path, monkeypatch):
    """--analysis-eval-iters changed: the earlier analysis.json was reported as the new one."""
    compare = load_compare()
    monkeypatch.setattr(compare, "RUNS", tmp_path)
    model = compare.Model("gshard", "GShard")
    out = compare.run_dir(model, 11) / "analysis"
    out.mkdir(parents=True)
    (out / "analysis.json").write_text(json.dumps({"settings": {"eval_iters": 16}}))
    started = []

    def fake_jobs(jobs, parallel):
        started.extend(jobs)
        for _, command, _ in jobs:
            (out / "analysis.json").write_text(json.dumps({"settings": {
                "eval_iters": int(command[command.index("--eval-iters") + 1])}}))
        return {}

    monkeypatch.setattr(compare, "run_jobs", fake_jobs)
    assert compare.analyse_all([model], [11], 1, 16)[model.key, 11]["settings"]["eval_iters"] == 16
    assert not started  # the same settings: reused
    assert compare.analyse_all([model], [11], 1, 4)[model.key, 11]["settings"]["eval_iters"] == 4
    assert len(started) == 1 and "--force" in started[0][1]


def test_the_table_gives_the_loss_rise_with_the_shared_experts_removed(tmp_path, monkeypatch):
    """Beside the rises of the top-p column it printed the loss itself, which the recorded
    paper_ablation.md then read as a rise."""
    from dsmoe_megatron.yaml_config import load_run_config

    compare = load_compare()
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    curve = [(1, 2.0), (2, 1.0)]
    summary = {"models": {"fine4": {"label": "DeepSeekMoE", "mean": 1.0, "std": 0.0,
                                    "final_valid": [1.0, 1.0], "valid_curves": [curve, curve]}},
               "pairs": {}}
    redundancy = {"fine4": {"disabled_top": [0, 1], "rise_mean": [0.0, 0.3],
                            "loss_mean": [0.4, 0.7],  # the analyses' own losses, mean of 2 seeds
                            "shared_removed": [{"loss": 0.5}, {"loss": 0.7}]}}
    run = load_run_config(compare.BASE_CONFIG, [], instantiate_checks=False)
    compare.write_results(run, summary, redundancy, {}, {}, [1, 2], [], [])
    row = (tmp_path / "paper_ablation_table.md").read_text().splitlines()[-1]
    assert row == "| DeepSeekMoE | 0: +0.000, 1: +0.300 | +0.200 |"
