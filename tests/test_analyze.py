"""dsmoe-analyze: expert routing with top experts disabled, shared experts removed, the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dsmoe_megatron import analyze, checkpoint, convert, runtime
from dsmoe_megatron.config import DeepSeekMoEConfig, deepseek_defaults
from dsmoe_megatron.model import build_model, padded_vocab_size
from dsmoe_megatron.router import TopKRouter

ROOT = Path(__file__).resolve().parents[1]
from dsmoe_megatron.synthetic import LanguageConfig, write_corpus

SEQ = 32
VOCAB = 259  # the byte tokenizer's
TINY = dict(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
            num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=16,
            moe_num_shared_experts=1, moe_first_k_dense=1, init_method_std=0.05,
            moe_aux_loss_coeff=0.01)


def test_router_skips_exactly_the_top_p_experts():
    """Each token goes to the experts ranked p+1 .. p+K by its routing probabilities."""
    for pre_softmax in (True, False):
        cfg = DeepSeekMoEConfig(**{**deepseek_defaults(), "moe_router_pre_softmax": pre_softmax},
                                num_layers=1, hidden_size=16, num_attention_heads=2,
                                num_moe_experts=10, moe_router_topk=3, moe_ffn_hidden_size=8)
        torch.manual_seed(0)
        router = TopKRouter(cfg).eval()
        hidden = torch.randn(7, 3, 16)
        probs = torch.softmax(hidden.reshape(-1, 16).double() @ router.weight.double().t(), -1)
        ranking = torch.argsort(probs, dim=-1, descending=True)
        default = router(hidden)
        for p in range(0, 8):
            router.excluded_top_experts = p
            routing = router(hidden)
            chosen = ranking[:, p:p + 3]
            assert torch.equal(routing.expert_idx.sort(-1).values, chosen.sort(-1).values), p
            gates = probs.gather(-1, routing.expert_idx)
            if not pre_softmax:
                gates = gates / gates.sum(-1, keepdim=True)
            torch.testing.assert_close(routing.gates.double(), gates, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(routing.probs.double(), probs, rtol=1e-6, atol=1e-7)
            if p == 0:
                assert torch.equal(routing.expert_idx, default.expert_idx)
                assert torch.equal(routing.gates, default.gates)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny MoE checkpoint trained a few steps, its data (a small synthetic corpus), and the
    loaded model with its evaluation batches."""
    runtime.initialize()
    root = tmp_path_factory.mktemp("analyze")
    prefix = write_corpus(root / "data" / "corpus", 60_000, LanguageConfig(words_per_class=16))
    run = convert.make_run_config(TINY, seq_length=SEQ, overrides=[
        f"data_path=[{prefix}]", "split=90,10,0"])
    model = build_model(run.model, padded_vocab_size(run.train.vocab_size), SEQ,
                        pre_process=True, post_process=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 256, (4, SEQ + 1), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(tokens[:, :-1], torch.arange(SEQ).expand(4, SEQ), None,
              labels=tokens[:, 1:]).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    convert._yaml_config().dump_run_config(run, root / "run.yaml")
    checkpoint.save(root / "save", 3, [model], run_config_yaml=(root / "run.yaml").read_text())
    run, loaded = analyze.load_model(root / "save")
    batches = analyze.eval_batches(run, analyze.EvalSettings(eval_iters=3, micro_batch_size=4))
    yield SimpleNamespace(root=root, save=root / "save", run=run, model=loaded, batches=batches)
    runtime.shutdown()


def test_disabling_experts_leaves_no_trace(tiny):
    """p = 0 changes nothing; p = 1 changes the loss; afterwards the model is as before.
    (That p = 0 gives the model's true loss is checked against the Hugging Face model below.)"""
    normal, normal_load = analyze.evaluate(tiny.model, tiny.batches, VOCAB)
    with analyze.disabled_top_experts(tiny.model, 0):
        zero, zero_load = analyze.evaluate(tiny.model, tiny.batches, VOCAB)
    assert zero == normal
    assert all(torch.equal(a, b) for a, b in zip(zero_load, normal_load))
    with analyze.disabled_top_experts(tiny.model, 1):
        one, _ = analyze.evaluate(tiny.model, tiny.batches, VOCAB)
    assert abs(one - normal) > 1e-4
    assert all(layer.router.excluded_top_experts == 0 for layer in analyze.moe_layers(tiny.model))
    assert analyze.evaluate(tiny.model, tiny.batches, VOCAB)[0] == normal


def test_expert_load_counts_every_routed_token(tiny):
    _, loads = analyze.evaluate(tiny.model, tiny.batches, VOCAB)
    tokens = sum(b["tokens"].numel() for b in tiny.batches)
    assert len(loads) == TINY["num_layers"] - TINY["moe_first_k_dense"]
    for load in loads:
        assert load.shape == (TINY["num_moe_experts"],)
        assert int(load.sum()) == tokens * TINY["moe_router_topk"]


def test_shared_removal_equals_zeroed_shared_weights(tiny):
    with analyze.shared_experts_removed(tiny.model):
        removed, _ = analyze.evaluate(tiny.model, tiny.batches, VOCAB)
    weights = [layer.shared_experts.linear_fc2.weight for layer in analyze.moe_layers(tiny.model)]
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w in weights:
                w.zero_()
        zeroed, _ = analyze.evaluate(tiny.model, tiny.batches, VOCAB)
    finally:
        with torch.no_grad():
            for w, value in zip(weights, saved):
                w.copy_(value)
    assert removed == zeroed
    assert abs(removed - analyze.evaluate(tiny.model, tiny.batches, VOCAB)[0]) > 1e-4


def test_shared_removed_with_extra_routed_expert_by_hand(tiny):
    """Block output with the shared expert removed and top-(K+1) routing, per token by hand."""
    layer = analyze.moe_layers(tiny.model)[0]
    x = torch.randn(5, 2, TINY["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), analyze.shared_experts_removed(tiny.model, extra_routed=1):
        out, _ = layer(x)
    k = TINY["moe_router_topk"] + 1
    e = layer.experts
    expected = []
    for token in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(layer.router.weight.double() @ token.double(), -1)
        top = torch.topk(probs, k)
        y = torch.zeros(token.shape, dtype=torch.float64)
        for p, i in zip(top.values, top.indices):
            gate, up = e.gate_up_proj[i].double().chunk(2)  # [gate; up] rows of expert i
            h = F.silu(gate @ token.double()) * (up @ token.double())
            y += p * (e.down_proj[i].double() @ h)
        expected.append(y)
    torch.testing.assert_close(out.double(), torch.stack(expected).view(x.shape), rtol=1e-5,
                               atol=1e-6)
    assert layer.router.topk == TINY["moe_router_topk"]


def check_outputs(out: Path, tokens: int) -> dict:
    result = json.loads((out / "analysis.json").read_text())
    for name in ("expert_load.png", "redundancy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["eval_tokens"] == tokens
    assert result["redundancy"][0] == {"disabled_top": 0, "fraction_of_routed": 0.0,
                                       "loss": result["loss"]}
    # 25% of 8 routed experts: p = 1, 2.
    assert [p["disabled_top"] for p in result["redundancy"]] == [0, 1, 2]
    for row in result["expert_load"]:
        assert sum(row["tokens_per_expert"]) == tokens * TINY["moe_router_topk"]
    assert result["shared_removed"]["extra_routed"] == 1
    return result


def test_cli_writes_json_and_plots_and_keeps_earlier_results(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(tiny.save), "--out", str(out), "--eval-iters", "3", "--micro-batch-size", "4"]
    assert analyze.main(args) == 0
    result = check_outputs(out, tokens=3 * 4 * SEQ)
    assert abs(result["loss"] - analyze.evaluate(tiny.model, tiny.batches, VOCAB)[0]) < 1e-6
    before = (out / "analysis.json").read_text()
    assert analyze.main(args) == 2
    assert "--force to replace them" in capsys.readouterr().err  # analysis.json and plots
    assert (out / "analysis.json").read_text() == before


def test_a_plot_kept_in_out_is_not_replaced_without_force(tiny, tmp_path, capsys):
    """Each file the analysis writes, not only analysis.json, is replaced only with --force."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "redundancy.png").write_bytes(b"a user's figure")
    args = [str(tiny.save), "--out", str(out), "--eval-iters", "1", "--micro-batch-size", "2"]
    assert analyze.main(args) == 2
    err = capsys.readouterr().err
    assert "redundancy.png" in err and "--force to replace it " in err, err
    assert len(err.splitlines()) == 1, err
    assert (out / "redundancy.png").read_bytes() == b"a user's figure"
    assert not (out / "analysis.json").exists()
    assert analyze.main([*args, "--force"]) == 0
    assert (out / "redundancy.png").read_bytes()[:4] == b"\x89PNG"


def test_force_without_matplotlib_deletes_the_earlier_plots(tiny, tmp_path, capsys,
                                                              monkeypatch):
    """The plots of an earlier analysis would sit beside the new analysis.json looking like
    its own: --force without matplotlib deletes them and says so."""
    out = tmp_path / "out"
    out.mkdir()
    for name in analyze.OUTPUTS:
        (out / name).write_bytes(b"an earlier analysis")
    monkeypatch.setattr(analyze, "pyplot", lambda: None)
    assert analyze.main([str(tiny.save), "--out", str(out), "--eval-iters", "1",
                         "--micro-batch-size", "2", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json"]
    assert json.loads((out / "analysis.json").read_text())["eval_tokens"] == 2 * SEQ
    assert capsys.readouterr().out.splitlines()[-1] == (
        "no plots: matplotlib is not installed (pip install matplotlib); deleted the earlier "
        "analysis's expert_load.png and redundancy.png")


def test_a_validation_split_smaller_than_asked_is_evaluated_whole_each_sample_once(
        tiny, tmp_path, capsys):
    """--eval-iters x --micro-batch-size past the split's samples evaluated some of them twice
    or more (Megatron builds more epochs) and reported the repeats as more tokens."""
    from dsmoe_megatron.data import build_gpt_datasets, open_indexed_dataset
    from dsmoe_megatron.synthetic import split_documents

    # The samples of one pass, by hand: (tokens of the validation documents - 1) // SEQ.
    dataset = open_indexed_dataset(tiny.run.train.data_path[0])
    valid = split_documents(len(dataset.sequence_lengths), "90,10,0")["valid"]
    samples = (int(dataset.sequence_lengths[valid.start:valid.stop].sum()) - 1) // SEQ
    settings = analyze.EvalSettings(eval_iters=samples, micro_batch_size=3)  # asks for 3x
    batches = analyze.eval_batches(tiny.run, settings)
    rows = sorted(tuple(r.tolist()) for b in batches for r in b["tokens"])
    _, one_pass = build_gpt_datasets(tiny.run.train.data_path, SEQ, tiny.run.train.seed,
                                     split="90,10,0", train_samples=1)
    assert len(one_pass) == samples  # the count by hand: no second epoch
    assert rows == sorted(tuple(one_pass[i]["tokens"].tolist()) for i in range(samples))
    assert [len(b["tokens"]) for b in batches] == [3] * (samples // 3) + (
        [samples % 3] if samples % 3 else [])
    out = tmp_path / "out"
    assert analyze.main([str(tiny.save), "--out", str(out), "--eval-iters", str(samples),
                         "--micro-batch-size", "3"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert (result["eval_samples"], result["eval_tokens"]) == (samples, samples * SEQ)
    assert (f"over {samples * SEQ} tokens (the whole validation split: {samples} samples, not "
            f"the {3 * samples} of --eval-iters x --micro-batch-size)") in capsys.readouterr().out


def test_a_seq_length_past_the_trained_one_is_noted(tiny, tmp_path, capsys):
    """RoPE runs at any length, so a --seq-length past the run's is evaluated, with a note that
    the positions past it were never trained; the run's own length gets no note."""
    args = ["--eval-iters", "1", "--micro-batch-size", "2"]
    assert analyze.main([str(tiny.save), "--out", str(tmp_path / "long"), "--seq-length",
                         str(2 * SEQ), *args]) == 0
    assert json.loads((tmp_path / "long" / "analysis.json").read_text())["eval_tokens"] == 4 * SEQ
    err = capsys.readouterr().err
    assert err == (f"dsmoe-analyze: note: --seq-length {2 * SEQ} is longer than the {SEQ} tokens "
                   f"{tiny.save} was trained on (run.yaml's seq_length): its RoPE positions past "
                   f"{SEQ} were never trained, so the losses are those of the model run past its "
                   "length\n"), err
    assert analyze.main([str(tiny.save), "--out", str(tmp_path / "own"), "--seq-length",
                         str(SEQ), *args]) == 0
    assert capsys.readouterr().err == ""


def hf_loss(hf_dir: Path, batches) -> float:
    """The exported model's loss in the Hugging Face modeling code (no Megatron involved)."""
    from dsmoe_megatron.hf.modeling_deepseek import DeepseekForCausalLM

    model = DeepseekForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["tokens"]).logits
            total += float(F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                           reduction="sum"))
            count += b["labels"].numel()
    return total / count


def test_disabling_no_expert_reproduces_the_hf_model_loss(tiny, tmp_path):
    """On the checkpoint and on its HF export, the analysis's loss with no expert disabled is
    the loss of the exported model in the Hugging Face modeling code."""
    hf = convert.export_to_hf(tiny.save, tmp_path / "hf", dtype="fp32")
    reference = hf_loss(hf, tiny.batches)
    for source in (tiny.save, hf):
        out = tmp_path / source.name
        # The same data, split, seed and shapes as the checkpoint's run: the same batches.
        assert analyze.main([str(source), "--out", str(out), "--eval-iters", "3",
                             "--micro-batch-size", "4", "--data-path",
                             *tiny.run.train.data_path, "--split", "90,10,0"]) == 0
        result = check_outputs(out, tokens=3 * 4 * SEQ)
        assert abs(result["redundancy"][0]["loss"] - reference) < 1e-5, source


def test_an_hf_export_is_analysed_with_the_defaults_from_hf_gives_it(tiny, tmp_path, capsys):
    """An HF export gets from-hf's defaults: the shipped corpus and split 969,30,1, whose test
    share holds no document of that corpus. The analysis evaluates the validation split only,
    so the empty test share must not stop it. It says which split it took: not the run's, so
    the loss is not its checkpoint's. Its output names the export, never the temporary
    directory it converts it into (gone when it ends)."""
    from dsmoe_megatron.data import default_corpus_prefix, open_indexed_dataset
    from dsmoe_megatron.synthetic import split_documents

    hf = convert.export_to_hf(tiny.save, tmp_path / "hf", dtype="fp32")
    split = convert.build_run_config(convert.read_hf_config(hf)).train.split
    lengths = open_indexed_dataset(default_corpus_prefix()).sequence_lengths
    test = split_documents(len(lengths), split)["test"]
    assert int(lengths[test.start:test.stop].sum()) == 0  # the case this is about
    out = tmp_path / "out"
    assert analyze.main([str(hf), "--out", str(out), "--eval-iters", "2",
                         "--micro-batch-size", "2"]) == 0
    assert json.loads((out / "analysis.json").read_text())["eval_tokens"] == 2 * 2 * SEQ
    captured = capsys.readouterr()
    assert (f"dsmoe-analyze: {hf} carries no data settings: evaluating the validation part of "
            f"split {split} (seed ") in captured.err
    assert "dsmoe-analyze-" not in captured.out + captured.err, captured


def test_an_hf_export_notes_its_pretraining_tp_once(tiny, tmp_path, capsys):
    """config.json is read twice (the corpus check, then from-hf): the note is printed once."""
    hf = convert.export_to_hf(tiny.save, tmp_path / "hf", dtype="fp32")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "pretraining_tp": 2}))
    assert analyze.main([str(hf), "--out", str(tmp_path / "out"), "--eval-iters", "1",
                         "--micro-batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("pretraining_tp=2 only split matmuls; ignored") == 1, err


def test_an_hf_export_with_a_broken_tokenizer_file_is_analysed(tiny, tmp_path):
    """The analysis reads no tokenizer files, so from-hf's check of them does not stop it."""
    hf = convert.export_to_hf(tiny.save, tmp_path / "hf", dtype="fp32")
    (hf / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    out = tmp_path / "out"
    assert analyze.main([str(hf), "--out", str(out), "--eval-iters", "1",
                         "--micro-batch-size", "2", "--data-path", *tiny.run.train.data_path,
                         "--split", "90,10,0"]) == 0
    assert json.loads((out / "analysis.json").read_text())["eval_tokens"] == 2 * SEQ


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert analyze.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # a mistyped checkpoint leaves no empty --out


def test_a_checkpoint_without_run_yaml_says_how_to_analyse_it(tiny, tmp_path, capsys):
    """A checkpoint of Megatron-LM's training loop keeps no run.yaml: the line says to export it
    with the YAML it was trained with (to-hf's --config) and analyse the export; dsmoe-analyze
    itself has no --config."""
    save = tmp_path / "megatron_lm"
    shutil.copytree(tiny.save, save)
    (checkpoint.resolve(save) / checkpoint.RUN_CONFIG_NAME).unlink()
    assert analyze.main([str(save), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"dsmoe-convert to-hf --checkpoint {save} --out HF_DIR --config" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_unusable_out_is_refused_before_the_evaluation(tiny, tmp_path, capsys, monkeypatch):
    """--out on a file, or under one: one line naming it, before minutes of evaluation."""
    def evaluated(*args):
        raise AssertionError("evaluated before --out was checked")

    monkeypatch.setattr(analyze, "load_model", evaluated)
    taken = tmp_path / "taken"
    taken.write_text("a user's file\n")
    for out, problem in ((taken, "is a file, not a directory"),
                         (taken / "sub", f"{taken} is a file, so no directory can be created")):
        assert analyze.main([str(tiny.save), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dsmoe-analyze: --out {out}: {problem}"), err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert taken.read_text() == "a user's file\n"


def test_non_finite_weights_or_loss_are_refused_and_nothing_is_written(tiny, tmp_path, capsys,
                                                                      monkeypatch):
    """A NaN weight is named with its checkpoint (by the checkpoint's load); a NaN loss from
    finite weights is refused too. analysis.json is never written with NaN (which is not JSON)."""
    weight = tiny.model.decoder.layers[1].mlp.router.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight[2, 3] = float("nan")
    try:
        checkpoint.save(tmp_path / "nan", 3, [tiny.model],
                        run_config_yaml=(tiny.root / "run.yaml").read_text())
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    args = ["--eval-iters", "1", "--micro-batch-size", "2"]
    assert analyze.main([str(tmp_path / "nan"), "--out", str(tmp_path / "a"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dsmoe-analyze: {tmp_path / 'nan' / 'iter_0000003'} holds NaN or inf "
                          "values (decoder.layers.1.mlp.router.weight)"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()  # the --out it created for the analysis is gone again

    real = analyze.analyze
    monkeypatch.setattr(analyze, "analyze", lambda *a: {**real(*a), "loss": float("nan")})
    assert analyze.main([str(tiny.save), "--out", str(tmp_path / "b"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dsmoe-analyze: {tiny.save}: the model's loss is not finite"), err
    assert not (tmp_path / "b").exists()
    kept = tmp_path / "kept" / "b"  # an --out that was there stays, with what it held
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("mine\n")
    assert analyze.main([str(tiny.save), "--out", str(kept), *args]) == 1
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_an_out_that_cannot_be_created_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """mkdir failing where the up-front check cannot tell (/proc, /sys, a race): why, and the
    path, in one line."""
    def refuse(self, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert analyze.main([str(tiny.save), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err == (f"dsmoe-analyze: cannot create --out {tmp_path / 'x'}: Operation not "
                   f"permitted ({tmp_path / 'x'})\n"), err


@pytest.mark.parametrize("split", ["abc", "95,0,5", "100", "1,2,3,4", "-1,2", "1e3,1", ""])
def test_a_bad_split_names_the_option(split, tmp_path, capsys):
    """Megatron reads any text as weights ("abc": none, then 0/0); the option is named."""
    with pytest.raises(SystemExit) as exit_info:
        analyze.main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), f"--split={split}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dsmoe-analyze: error: argument --split: {split!r} is not train,valid,test weights "
        "with a validation share, e.g. 95,5,0")


def test_a_good_split_is_taken(tmp_path, capsys):
    for split in ("90,10", "0,1,0", " 98.5, 1.5 ,0"):
        assert analyze.main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"),
                             "--split", split]) == 1
        assert "ckpt does not exist" in capsys.readouterr().err  # past the arguments


def test_a_world_size_left_over_in_the_shell_is_named(tiny, tmp_path):
    env = {**os.environ, "WORLD_SIZE": "abc", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dsmoe_megatron.analyze", str(tiny.save),
                           "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "dsmoe-analyze: WORLD_SIZE='abc': this tool runs as a single process (run it without "
        "torchrun, and unset WORLD_SIZE if it is left over in the shell)")
