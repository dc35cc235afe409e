"""dsmoe-convert: Megatron dist checkpoint <-> Hugging Face safetensors (CPU, fp32 unless noted).

* to-hf of a briefly trained single-rank model: the HF model's logits equal Megatron's;
* HF -> Megatron -> HF is bit-exact on every tensor (fp32 and bf16 files);
* a synthetic model shaped like the released deepseek-moe-16b-base (narrower and shallower:
  first layer dense, 2 shared + 64 routed experts, top-6) converts both ways;
* clear errors for missing / unexpected / mis-shaped tensors, unsupported configs, bad paths.

Conversions run in this process under one module-scoped single-rank runtime; one test runs the
CLI in a fresh process (how a multi-rank training job's checkpoint is exported).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import SafetensorError  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dsmoe_megatron import checkpoint, convert, runtime  # noqa: E402
from dsmoe_megatron.convert import ConversionError  # noqa: E402
from dsmoe_megatron.hf import AUTO_MAP, REMOTE_CODE_FILES  # noqa: E402
from dsmoe_megatron.hf.mapping import single_rank_config  # noqa: E402
from dsmoe_megatron.hf import streaming  # noqa: E402
from dsmoe_megatron.hf.streaming import SafetensorsReader  # noqa: E402
from dsmoe_megatron.model import build_model, padded_vocab_size  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_convert_memory as bench  # noqa: E402  (synthetic models, checkpoint comparison)

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek_moe_16b_config.json"
REPO = Path(__file__).resolve().parents[1]
VOCAB = 259  # the byte tokenizer's (not a multiple of 128: the Megatron side has padding rows)
SEQ = 16
TINY = dict(
    num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,  # GQA: 2 kv heads
    ffn_hidden_size=64, num_moe_experts=8, moe_router_topk=3, moe_ffn_hidden_size=16,
    moe_num_shared_experts=1, moe_first_k_dense=1, init_method_std=0.05,
    moe_aux_loss_coeff=0.01,
)


@pytest.fixture(scope="module")
def rt():
    runtime.initialize()
    yield
    runtime.shutdown()


def positions(batch: int, seq: int = SEQ) -> torch.Tensor:
    return torch.arange(seq).expand(batch, seq).contiguous()


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens, positions(*tokens.shape), None)


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from dsmoe_megatron.hf.modeling_deepseek import DeepseekForCausalLM

    model = DeepseekForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def checkpoint_tensor(ckpt: Path, key: str):
    """(global shape, dtype) of a tensor in a dist checkpoint's metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    entry = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata[key]
    return tuple(entry.size), entry.properties.dtype


def load_single_rank(save_dir: Path):
    """The model of a dist checkpoint, built on one rank from its own run.yaml, as dsmoe-train
    builds it (the padding rows of the vocabulary masked)."""
    ckpt = checkpoint.resolve(save_dir)
    run = convert._yaml_config().load_run_config(ckpt / checkpoint.RUN_CONFIG_NAME)
    shape, dtype = checkpoint_tensor(ckpt, "embedding.word_embeddings.weight")
    model = build_model(single_rank_config(run.model, dtype), shape[0],
                        run.train.seq_length, pre_process=True, post_process=True,
                        real_vocab_size=run.train.vocab_size)
    checkpoint.load(ckpt, [model])
    return run, model


# ------------------------------------------------------------------------------------------
# Megatron -> HF
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(rt, tmp_path_factory):
    """A tiny model after a few AdamW steps, saved as a dist checkpoint with its run.yaml."""
    root = tmp_path_factory.mktemp("trained")
    run = convert.make_run_config(TINY, vocab_size=None, seq_length=SEQ)  # byte tokenizer
    assert run.train.vocab_size == VOCAB
    assert run.model.params_dtype == torch.float32
    model = build_model(run.model, padded_vocab_size(VOCAB, 1), SEQ, pre_process=True,
                        post_process=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=gen)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(tokens[:, :-1], positions(4), None, labels=tokens[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    convert._yaml_config().dump_run_config(run, root / "run.yaml")
    checkpoint.save(root / "save", 4, [model],
                    run_config_yaml=(root / "run.yaml").read_text())
    model.eval()
    return SimpleNamespace(save=root / "save", model=model, run=run, root=root)


@pytest.fixture(scope="module")
def trained_long_context(rt, tmp_path_factory):
    """Two iterations of dsmoe-train (fp32 on CPU) with RoPE base 500000, as a model trained for
    longer context would have."""
    save = tmp_path_factory.mktemp("long_context") / "save"
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "dsmoe_megatron.train",
                    str(REPO / "yaml_configs" / "tiny.yaml"),
                    "language_model.num_layers=2", "language_model.rotary_base=500000",
                    f"seq_length={SEQ}", "micro_batch_size=2", "global_batch_size=2",
                    "train_iters=2", "lr_warmup_iters=1", "eval_interval=null",
                    "tensorboard_dir=null", f"save={save}"], env=env, check=True, timeout=240)
    return SimpleNamespace(save=save)


@pytest.fixture(scope="module")
def exported(trained):
    return convert.export_to_hf(trained.save, trained.root / "hf", dtype="fp32",
                                max_shard_size="60KB")


def test_export_writes_a_complete_hf_directory(trained, exported):
    files = sorted(p.name for p in exported.glob("*.safetensors"))
    assert len(files) >= 3
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                     for i in range(1, len(files) + 1)]
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    tensors = read_tensors(exported)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["model.embed_tokens.weight"].shape == (VOCAB, 32)
    assert tensors["lm_head.weight"].shape == (VOCAB, 32)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    assert tensors["model.layers.2.mlp.experts.7.down_proj.weight"].shape == (32, 16)

    config = json.loads((exported / "config.json").read_text())
    expected = dict(
        model_type="deepseek", architectures=["DeepseekForCausalLM"], auto_map=AUTO_MAP,
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=1,
        norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.01, seq_aux=True,
        rope_theta=10000.0, rope_scaling=None, rms_norm_eps=trained.run.model.layernorm_epsilon,
        max_position_embeddings=SEQ, torch_dtype="float32", tie_word_embeddings=False,
        attention_bias=False, hidden_act="silu",
    )
    assert {k: config.get(k) for k in expected} == expected
    for name in REMOTE_CODE_FILES:
        assert (exported / name).is_file()
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert (exported / "tokenizer.json").is_file()
    assert not exported.with_name(exported.name + ".partial").exists()


def test_exported_shards_are_as_readable_as_any_file_the_user_creates(trained, tmp_path):
    """safetensors writes its files 0600; colleagues on a shared cluster could not read them."""
    old = os.umask(0o027)
    try:
        out = convert.export_to_hf(trained.save, tmp_path / "hf", max_shard_size="60KB")
        (tmp_path / "probe").touch()  # what open() gives a new file under this umask
    finally:
        os.umask(old)
    expected = (tmp_path / "probe").stat().st_mode & 0o777
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.glob("*.safetensors")}
    assert len(modes) >= 3 and set(modes.values()) == {expected} == {0o640}, modes


def test_export_logits_match_megatron(trained, exported):
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    reference = megatron_logits(trained.model, tokens)
    assert reference.shape[-1] == padded_vocab_size(VOCAB, 1)
    logits = hf_logits(exported, tokens)
    assert logits.shape == (2, SEQ, VOCAB)
    diff = (logits - reference[..., :VOCAB]).abs().max().item()
    assert diff <= 1e-4, diff


def test_hf_megatron_hf_round_trip_is_bit_exact(trained, exported, tmp_path):
    save = convert.import_from_hf(exported, tmp_path / "megatron")
    run, model = load_single_rank(save)
    assert run.model.num_query_groups == 2 and run.train.vocab_size == VOCAB
    # The imported weights are the trained ones; padding rows are zero.
    ours = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for name, value in trained.model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert torch.equal(ours[name][:VOCAB], value[:VOCAB]), name
            assert not ours[name][VOCAB:].any(), name
        else:
            assert torch.equal(ours[name], value), name
    again = convert.export_to_hf(save, tmp_path / "hf", dtype="fp32")
    assert_bit_exact(read_tensors(exported), read_tensors(again))
    assert json.loads((again / "config.json").read_text()) == \
        json.loads((exported / "config.json").read_text())


@pytest.mark.parametrize("source, rope_theta", [
    ("trained", 10000.0),
    pytest.param("trained_long_context", 500000.0, marks=pytest.mark.slow),
])
def test_cli_export_in_a_fresh_process_loads_as_remote_code(source, rope_theta, request,
                                                            tmp_path):
    """`dsmoe-convert to-hf` as its own process, then AutoModelForCausalLM with remote code: its
    loss is Megatron's, with the RoPE base of the run (config.json's rope_theta)."""
    save = request.getfixturevalue(source).save
    out = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    script = f"""
import sys, torch
from dsmoe_megatron.convert import main
assert main(["to-hf", "--checkpoint", {str(save)!r}, "--out", {str(out)!r},
             "--dtype", "fp32"]) == 0
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True,
                                             dtype=torch.float32).eval()
assert type(model).__name__ == "DeepseekForCausalLM"
tokens = torch.tensor({tokens.tolist()})
with torch.no_grad():
    result = model(tokens, labels=tokens)
torch.save((result.logits, result.loss), {str(tmp_path / "outputs.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True,
                   timeout=240)
    assert json.loads((out / "config.json").read_text())["rope_theta"] == rope_theta
    run, model = load_single_rank(save)
    assert run.model.rotary_base == rope_theta
    head_dim = run.model.kv_channels
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq.double(), inv_freq, rtol=1e-6,
                               atol=0)
    logits, loss = torch.load(tmp_path / "outputs.pt")
    reference = megatron_logits(model, tokens)[..., :VOCAB]
    assert (logits - reference).abs().max().item() <= 1e-4
    # Megatron's own loss of the same predictions (HF shifts the labels itself).
    with torch.no_grad():
        megatron_loss = model(tokens[:, :-1], positions(2, SEQ - 1), None,
                              labels=tokens[:, 1:]).mean()
    assert abs(loss.item() - megatron_loss.item()) <= 1e-5, (loss, megatron_loss)
    if source == "trained":
        assert_bit_exact(read_tensors(request.getfixturevalue("exported")), read_tensors(out))


def test_export_refuses_a_non_empty_output_unless_forced(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="not empty.*--force"):
        convert.export_to_hf(trained.save, out)
    assert (out / "keep.txt").exists()
    assert not (tmp_path / "out.partial").exists()
    with pytest.raises(ConversionError, match="contains the input"):
        convert.export_to_hf(trained.save, trained.save, force=True)
    assert checkpoint.resolve(trained.save).is_dir()
    convert.export_to_hf(trained.save, out, force=True, dtype="bf16")
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(out).values())


def test_a_failed_export_leaves_the_previous_output_intact(trained, tmp_path, monkeypatch,
                                                            capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(convert, "write_safetensors_shards", disk_full)
    with pytest.raises(SafetensorError, match="No space left"):
        convert.export_to_hf(trained.save, out, force=True)
    code, err = run_cli(["to-hf", "--checkpoint", str(trained.save), "--out", str(out),
                         "--force"], capsys)
    assert code == 2 and "No space left on device" in err and "MiB free" in err, err
    assert (out / "keep.txt").read_text() == "x"
    assert not (tmp_path / "out.partial").exists()


KILLED_BETWEEN_RENAMES = """
import os, sys
from dsmoe_megatron.convert import main
rename = os.replace
def replace(src, dst):
    if str(src).endswith(".partial"):  # the new output is complete; the old one moved aside
        os._exit(9)  # killed: no clean-up runs
    rename(src, dst)
os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


def test_a_replacing_export_killed_between_its_renames_loses_nothing(trained, tmp_path,
                                                                      capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    aside = tmp_path / "out.replaced-by-dsmoe-convert"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, "to-hf", "--checkpoint",
                           str(trained.save), "--out", str(out), "--force"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert not out.exists() and (aside / "keep.txt").read_text() == "x"
    # The next run puts the earlier output back, and without --force leaves it there.
    code, err = run_cli(["to-hf", "--checkpoint", str(trained.save), "--out", str(out)], capsys)
    assert code == 2 and f"restored {out} from {aside}" in err and "--force" in err, err
    assert (out / "keep.txt").read_text() == "x" and not aside.exists()
    # Killed after the new output took its place: the next run deletes the earlier one.
    aside.mkdir()
    (aside / "keep.txt").write_text("x")
    code, err = run_cli(["to-hf", "--checkpoint", str(trained.save), "--out", str(out),
                         "--force"], capsys)
    assert code == 0 and f"removed {aside}" in err, err
    assert not aside.exists() and (out / "config.json").is_file()
    assert not (out / "keep.txt").exists()


def test_a_replacing_export_whose_last_rename_fails_keeps_the_earlier_output(
        trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rename = os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src))
        rename(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    code, err = run_cli(["to-hf", "--checkpoint", str(trained.save), "--out", str(out),
                         "--force"], capsys)
    assert code == 2 and "Permission denied" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_output_that_cannot_be_a_directory_is_one_line(trained, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    code, err = run_cli(["to-hf", "--checkpoint", str(trained.save), "--out",
                         str(a_file / "hf")], capsys)
    assert code == 2 and "Not a directory (a part of the path is a file)" in err, err
    code, err = run_cli(["to-hf", "--checkpoint", str(trained.save), "--out", str(a_file),
                         "--force"], capsys)
    assert code == 2 and "is a file, not a directory" in err, err
    assert a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("out", [".", "./", ".."])
def test_an_output_that_is_or_holds_the_current_directory_is_one_line(trained, tmp_path, capsys,
                                                                       monkeypatch, out):
    """--out . failed with a traceback (ValueError: PosixPath('.') has an empty name); --out ..
    --force with 'Device or resource busy'."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for force in ([], ["--force"]):
        code, err = run_cli(["to-hf", "--checkpoint", str(trained.save), "--out", out, *force],
                            capsys)
        assert code == 2 and "the current directory" in err and "--out hf_model" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]
    assert not any((tmp_path / "cwd").iterdir())


def test_missing_checkpoint_dir(tmp_path, capsys):
    with pytest.raises(ConversionError, match="does not exist"):
        convert.export_to_hf(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no checkpoint at"):
        convert.export_to_hf(tmp_path / "empty", tmp_path / "out")
    assert convert.main(["to-hf", "--checkpoint", str(tmp_path / "nowhere"),
                         "--out", str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_a_hugging_face_directory_given_as_a_checkpoint_says_to_import_it(tmp_path):
    """load: or --checkpoint of an export (config.json + safetensors) was told 'no checkpoint
    at ...; check the path', of a path that was right, without the import that makes one."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model-00001-of-00001.safetensors").write_bytes(b"")
    expected = (f"{hf} is a Hugging Face model directory (config.json + safetensors), not a "
                f"checkpoint of dsmoe-train; to train from it, import it: dsmoe-convert from-hf "
                f"--hf {hf} --out DIR, then load: DIR")
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(expected)):
        checkpoint.resolve(hf)
    with pytest.raises(ConversionError, match=re.escape(expected)):
        convert.export_to_hf(hf, tmp_path / "out")


# ------------------------------------------------------------------------------------------
# HF -> Megatron
# ------------------------------------------------------------------------------------------

def scaled_16b_config(**changes) -> dict:
    """The released deepseek-moe-16b-base config.json, narrower and shallower: same structure
    (first layer dense, 2 shared + 64 routed experts, top-6, no top-k renormalisation)."""
    config = json.loads(FIXTURE.read_text())
    config.update(num_hidden_layers=3, hidden_size=64, intermediate_size=96,
                  moe_intermediate_size=8, num_attention_heads=4, num_key_value_heads=4,
                  vocab_size=300, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    config.update(changes)
    return config


def write_hf_model(directory: Path, config: dict, dtype=torch.bfloat16, seed: int = 0,
                   shards: int = 2) -> dict[str, torch.Tensor]:
    """A randomly initialised DeepseekForCausalLM (every tensor random, norms included) saved
    like a released checkpoint: config.json + sharded safetensors + index."""
    from dsmoe_megatron.hf.configuration_deepseek import DeepseekConfig
    from dsmoe_megatron.hf.modeling_deepseek import DeepseekForCausalLM

    fields = {k: v for k, v in config.items()
              if k not in ("architectures", "auto_map", "torch_dtype", "transformers_version")}
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(DeepseekConfig(**fields))
    tensors = {}
    for name, param in model.state_dict().items():
        scale = 0.1 if param.dim() > 1 else 0.2
        base = 1.0 if name.endswith("layernorm.weight") or name == "model.norm.weight" else 0.0
        tensors[name] = (base + scale * torch.randn(param.shape)).to(dtype)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(directory / filename), metadata={"format": "pt"})
        weight_map.update({n: filename for n in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return tensors


ARCHITECTURE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "n_shared_experts",
    "n_routed_experts", "num_experts_per_tok", "moe_layer_freq", "first_k_dense_replace",
    "norm_topk_prob", "scoring_func", "hidden_act", "rms_norm_eps", "rope_theta",
    "rope_scaling", "attention_bias", "tie_word_embeddings", "torch_dtype", "model_type",
    "architectures",
)


def test_16b_shaped_model_converts_both_ways(rt, tmp_path):
    config = scaled_16b_config()
    source = write_hf_model(tmp_path / "hf", config)
    tokenizer_config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<bos>"}
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert convert.main(["from-hf", "--hf", str(tmp_path / "hf"), "--out",
                         str(tmp_path / "megatron"), "--tensor-model-parallel-size", "2",
                         "--dtype", "fp32"]) == 0
    run, model = load_single_rank(tmp_path / "megatron")
    m = run.model
    assert (m.num_layers, m.num_moe_experts, m.moe_router_topk, m.moe_num_shared_experts,
            m.moe_ffn_hidden_size, m.moe_first_k_dense) == (3, 64, 6, 2, 8, 1)
    assert m.moe_router_pre_softmax and m.moe_router_load_balancing_type == "seq_aux_loss"
    assert m.moe_aux_loss_coeff == pytest.approx(0.001)  # omitted from the released config
    assert m.layernorm_epsilon == 1e-6 and m.tensor_model_parallel_size == 2
    assert run.train.vocab_size == 300 and run.train.seq_length == 64
    # Megatron's vocabulary is padded to a layout-independent multiple of 1024.
    assert model.embedding.word_embeddings.weight.shape == (1024, 64)

    # Megatron's forward of the imported weights matches HF's on the source files.
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(3))
    reference = hf_logits(tmp_path / "hf", tokens)
    diff = (megatron_logits(model, tokens)[..., :300] - reference).abs().max().item()
    assert diff <= 1e-4, diff

    back = convert.export_to_hf(tmp_path / "megatron", tmp_path / "back", dtype="bf16")
    assert_bit_exact(source, read_tensors(back))
    exported = json.loads((back / "config.json").read_text())
    assert {k: exported[k] for k in ARCHITECTURE_KEYS} == \
        {k: config[k] for k in ARCHITECTURE_KEYS}
    # from-hf kept the source's tokenizer files and special-token ids; to-hf brings them back.
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (1, 2)
    assert json.loads((back / "tokenizer_config.json").read_text()) == tokenizer_config


def test_the_source_generation_config_survives_the_round_trip(rt, tmp_path):
    """A chat model's sampling defaults: to-hf wrote only the special-token ids, so `generate`
    of the export decoded greedily where the source sampled."""
    from transformers import GenerationConfig

    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.7,
                  "top_p": 0.95, "max_new_tokens": 64, "transformers_version": "4.36.2"}
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(generation))
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "m")
    back = convert.export_to_hf(save, tmp_path / "back")
    assert json.loads((back / "generation_config.json").read_text()) == generation
    loaded = GenerationConfig.from_pretrained(back)
    assert (loaded.do_sample, loaded.temperature, loaded.top_p) == (True, 0.7, 0.95)
    # The ids come with the tokenizer chosen; without one, none (as in config.json).
    bare = json.loads((convert.export_to_hf(save, tmp_path / "bare", tokenizer=False)
                       / "generation_config.json").read_text())
    assert bare == {k: v for k, v in generation.items() if not k.endswith("_token_id")}


def test_a_chat_template_saved_by_transformers_survives_the_round_trip(rt, tmp_path):
    """transformers saves a chat template as chat_template.jinja, which the converter left
    behind: apply_chat_template of the export failed."""
    from transformers import AutoTokenizer

    from dsmoe_megatron.tokenizer import write_hf_tokenizer

    write_hf_model(tmp_path / "hf", small_hf_config(vocab_size=VOCAB), dtype=torch.float32,
                   shards=1)
    tok = AutoTokenizer.from_pretrained(write_hf_tokenizer(tmp_path / "tok"))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "chat_template.jinja").is_file()
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "m")
    back = convert.export_to_hf(save, tmp_path / "back")
    chat = [{"role": "user", "content": "hi"}]
    assert AutoTokenizer.from_pretrained(back, trust_remote_code=True).apply_chat_template(
        chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False) == "user: hi\n"


def test_a_fine_tuned_import_exports_with_the_source_tokenizer_and_token_ids(rt, tmp_path):
    """from-hf, then dsmoe-train with load: the import and a new save directory: to-hf of that
    found no kept source, and wrote no tokenizer and null bos/eos ids (generate never stops)."""
    import shutil

    import yaml

    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"tokenizer_class": "X"}')
    (tmp_path / "hf" / "generation_config.json").write_text('{"eos_token_id": 2, "top_p": 0.9}')
    imported = convert.import_from_hf(tmp_path / "hf", tmp_path / "import")
    # What dsmoe-train saves after training from it: the run.yaml names it as load:.
    for save, load in ((tmp_path / "tuned", imported), (tmp_path / "tuned2", tmp_path / "tuned")):
        ckpt = save / "iter_0000005"
        shutil.copytree(checkpoint.resolve(load), ckpt)
        run = yaml.safe_load((ckpt / checkpoint.RUN_CONFIG_NAME).read_text())
        (ckpt / checkpoint.RUN_CONFIG_NAME).write_text(yaml.safe_dump({**run, "load": str(load)}))
        (save / "latest").write_text("5")
        out = convert.export_to_hf(save, tmp_path / f"{save.name}_hf")
        config = json.loads((out / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
        assert json.loads((out / "generation_config.json").read_text()) == \
            {"bos_token_id": 1, "eos_token_id": 2, "top_p": 0.9}
        assert json.loads((out / "tokenizer_config.json").read_text()) == {"tokenizer_class": "X"}


def test_a_broken_tokenizer_file_is_refused_not_carried_into_the_export(rt, tmp_path, capsys):
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    broken = tmp_path / "hf" / "tokenizer.json"
    broken.write_text('{"version": "1.0", "model": {"vocab": {"a": 0')  # truncated
    out = tmp_path / "m"
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"tokenizer file {broken} is not valid JSON" in err and "--no-tokenizer" in err, err
    assert not out.exists()
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(out),
                         "--no-tokenizer"], capsys)
    assert code == 0 and "tokenizer: none" in err, err
    assert sorted(p.name for p in (out / convert.HF_SOURCE_DIR).iterdir()) == ["config.json"]
    # Without tokenizer files the export keeps the source's special-token ids (vocabulary 300 is
    # not the byte tokenizer's).
    code, err = run_cli(["to-hf", "--checkpoint", str(out), "--out", str(tmp_path / "a")], capsys)
    assert code == 0 and "tokenizer: none" in err, err
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    # A checkpoint imported before from-hf checked them: to-hf refuses the broken file too.
    (out / convert.HF_SOURCE_DIR / "tokenizer.json").write_text(broken.read_text())
    code, err = run_cli(["to-hf", "--checkpoint", str(out), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "tokenizer.json is not valid JSON" in err, err
    assert not (tmp_path / "b").exists()


def test_a_broken_generation_config_is_refused_on_import(rt, tmp_path, capsys):
    """from-hf kept it unread, and to-hf then failed on it with a JSONDecodeError traceback."""
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    broken = tmp_path / "hf" / "generation_config.json"
    broken.write_text('{"bos_token_id": 1, "eos_')
    out = tmp_path / "m"
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"dsmoe-convert: error: {broken} is not valid JSON ("), err
    assert "delete it (it holds generation defaults)" in err and not out.exists()
    # Valid JSON but no object: an AttributeError traceback from to-hf, which reads its keys.
    broken.write_text('["bos_token_id", 1]')
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"dsmoe-convert: error: {broken} must hold a JSON object, not a "
                          "list"), err
    assert "delete it (it holds generation defaults)" in err and not out.exists()


def test_to_hf_refuses_a_tokenizer_directory_without_tokenizer_files(trained, tmp_path, capsys):
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "README.md").write_text("not a tokenizer")
    code, err = run_cli(["to-hf", "--checkpoint", str(trained.save), "--out",
                         str(tmp_path / "hf"), "--tokenizer", str(empty)], capsys)
    assert code == 2 and f"tokenizer directory {empty} holds none of tokenizer.json" in err, err
    assert not (tmp_path / "hf").exists()


def test_a_source_without_tokenizer_files_exports_the_byte_tokenizer_its_vocabulary_is(
        rt, exported, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from dsmoe_megatron.tokenizer import ByteTokenizer

    source = tmp_path / "source"
    shutil.copytree(exported, source)
    for name in convert.TOKENIZER_FILES:
        (source / name).unlink(missing_ok=True)
    save = convert.import_from_hf(source, tmp_path / "m")
    out = convert.export_to_hf(save, tmp_path / "hf")
    byte = ByteTokenizer()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (byte.bos, byte.eod)
    text = "Grüße, tokenizer"
    ids = AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"]
    assert ids == byte.tokenize(text)


def train_from(save: Path, out: Path, *overrides: str) -> Path:
    """One dsmoe-train step from the checkpoint in ``save`` (``load:``), with the model of its
    run.yaml and a learning rate too small to move a weight by a bf16 rounding step."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "dsmoe_megatron.train",
                             str(checkpoint.resolve(save) / checkpoint.RUN_CONFIG_NAME),
                             f"load={save}", f"save={out}", f"seq_length={SEQ}",
                             "micro_batch_size=2", "global_batch_size=2", "train_iters=1",
                             "save_interval=1", "lr=1e-9", "min_lr=0", "lr_warmup_iters=0",
                             "eval_interval=null", "tensorboard_dir=null", *overrides],
                            env=env, check=True, timeout=600, capture_output=True, text=True)
    # An import, at iteration 0, was read from no sample stream, whatever its seq_length.
    assert "the sample stream it was reading" not in result.stdout + result.stderr
    return checkpoint.resolve(out)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_run_from_a_bf16_import_trains_the_imported_weights(rt, tmp_path, precision):
    """A bf16 run started (load:) from a from-hf import, which has no optimizer state: its
    optimizer's fp32 main copies kept the initial weights, and the first step copied them over
    the imported ones (the final norm went from the import's values back to 1.0). An fp32 run
    takes the bf16 weights as they are."""
    write_hf_model(tmp_path / "hf", small_hf_config(torch_dtype="bfloat16"), shards=1)
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "import")  # bf16, the source's
    after = train_from(save, tmp_path / "run", f"model_parallel.bf16={precision == 'bf16'}",
                       "seq_length=8")  # another than the import's: no stream to continue
    before = streaming.DistCheckpointReader(checkpoint.resolve(save))
    trained = streaming.DistCheckpointReader(after)
    for name in before.shapes:
        assert before.dtype(name) == torch.bfloat16
        assert trained.dtype(name) == convert.DTYPES[precision]
        torch.testing.assert_close(trained.get(name).float(), before.get(name).float(), rtol=0,
                                   atol=1e-8, msg=name)


def test_a_run_from_an_import_with_its_own_tokenizer_refuses_the_byte_corpus(rt, tmp_path,
                                                                             capsys):
    """data_path: null fine-tuned an import on the shipped corpus in the byte tokenizer's ids,
    which the model's own tokenizer reads as other tokens, and to-hf then paired the result
    with that tokenizer. The run is refused before anything is written; an import without
    tokenizer files, or with the byte tokenizer's vocabulary, still trains on it."""
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "import")
    with pytest.raises(subprocess.CalledProcessError) as refused:
        train_from(save, tmp_path / "run")
    err = refused.value.stderr
    assert refused.value.returncode == 1 and "Traceback" not in err, err
    kept = save / convert.HF_SOURCE_DIR
    assert (f"data_path is null, which trains on the corpus shipped with dsmoe_megatron in the "
            f"byte tokenizer's ids, but load: {save} (a Hugging Face import) has a tokenizer of "
            f"its own (tokenizer.json in {kept}), for which those ids are other tokens; tokenize "
            f"your text with it (dsmoe-preprocess --tokenizer {kept} --input FILE ... "
            "--output-prefix PREFIX) and set data_path to its prefix" in err), err
    assert not (tmp_path / "run").exists()
    # dsmoe-analyze without --data-path evaluated such a model on the same corpus: refused too,
    # on the HF directory and on the import
    from dsmoe_megatron import analyze

    capsys.readouterr()
    for source, files in ((tmp_path / "hf", tmp_path / "hf"), (save, kept)):
        out = tmp_path / f"analysis_{source.name}"
        assert analyze.main([str(source), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "[dsmoe-convert]" not in err, err  # refused before importing anything
        assert err.startswith(
            "dsmoe-analyze: Without --data-path the analysis evaluates the corpus shipped with "
            f"dsmoe_megatron in the byte tokenizer's ids, but {source} has a tokenizer of its "
            f"own (tokenizer.json in {files})") and err.endswith(
            "and pass --data-path PREFIX\n"), err
        assert not (out / "analysis.json").exists()
    from dsmoe_megatron.train import check_corpus_tokenizer

    # the byte tokenizer's vocabulary (an export of a model trained here) reads the corpus
    assert convert.byte_corpus_mismatch(kept, VOCAB, "", "", "") is None
    assert convert.byte_corpus_mismatch(kept, 300, "", "", "") is not None
    # a damaged copy of the files is named in a line (it was a traceback)
    (kept / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(subprocess.CalledProcessError) as refused:
        train_from(save, tmp_path / "run")
    err = refused.value.stderr
    assert "Traceback" not in err and f"{kept / 'tokenizer.json'} is not valid JSON" in err, err
    assert "replace it with a complete copy of the model's original file" in err, err
    assert "--no-tokenizer" not in err, err  # dsmoe-convert's option, not dsmoe-train's
    (save / convert.HF_SOURCE_DIR / "tokenizer.json").unlink()
    check_corpus_tokenizer(SimpleNamespace(load=str(save), vocab_size=300))


def test_data_beyond_an_imports_vocabulary_points_to_the_imports_tokenizer(rt, tmp_path):
    """Text tokenized with another model's tokenizer (ids past the import's vocabulary) was
    refused with the advice to change vocab_size, which the import's weights fix, or to
    tokenize for the byte tokenizer, which the model does not read: the fix is its own."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "import")
    prefix = str(tmp_path / "other_tokenizer")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(1000))
    for start in range(0, 4000, 100):
        builder.add_item(torch.arange(start, start + 100) % 1000)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    with pytest.raises(subprocess.CalledProcessError) as refused:
        train_from(save, tmp_path / "run", f"data_path=[{prefix}]", "split=100,0,0")
    err = refused.value.stderr
    assert "Traceback" not in err, err
    kept = save / convert.HF_SOURCE_DIR
    assert re.search(re.escape(f"data_path ['{prefix}'] holds token id ") + r"\d+" + re.escape(
        f", but vocab_size is 300: the data was tokenized with a larger vocabulary than the "
        f"model's own tokenizer (tokenizer.json in {kept}); tokenize the text with it "
        f"(dsmoe-preprocess --tokenizer {kept} --input FILE ... --output-prefix PREFIX) and set "
        "data_path to its prefix\n"), err), err


def test_a_run_from_an_import_resumes_after_the_import_is_removed(rt, tmp_path):
    """A resume reads its own save directory, not load:. The check of the import's tokenizer
    resolved load: first, so a run whose import's weights were deleted after it started (tens
    of GB for a 16B model) no longer resumed."""
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "import")
    trained = train_from(save, tmp_path / "run")
    shutil.rmtree(checkpoint.resolve(save))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    resumed = subprocess.run([sys.executable, "-m", "dsmoe_megatron.train",
                              str(trained / checkpoint.RUN_CONFIG_NAME), "train_iters=2",
                              "--resume"], env=env, timeout=600, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint.resolve(tmp_path / "run").name == "iter_0000002"


def test_from_hf_dtype_auto_is_the_source_weights_dtype(rt, tmp_path, capsys):
    """The released model is bf16: from-hf stored it in fp32 (twice the files of a 16B import)
    unless told --dtype bf16. Now the import and the export back keep the source's dtype, and
    the round trip with the defaults is bit-exact."""
    def stored(save: Path) -> torch.dtype:
        return checkpoint_tensor(checkpoint.resolve(save), "output_layer.weight")[1]

    source = write_hf_model(tmp_path / "hf", small_hf_config(torch_dtype="bfloat16"), shards=1)
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 0 and "iteration 0, bfloat16," in err, err
    run = convert._yaml_config().load_run_config(checkpoint.resolve(tmp_path / "m")
                                                 / checkpoint.RUN_CONFIG_NAME)
    assert stored(tmp_path / "m") == run.model.params_dtype == torch.bfloat16
    back = convert.export_to_hf(tmp_path / "m", tmp_path / "back", tokenizer=False)
    assert_bit_exact(source, read_tensors(back))
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # A precision set with --set is the run's; --dtype still wins over the source's.
    for argv, dtype in ((["--set", "model_parallel.fp16=true"], torch.float16),
                        (["--dtype", "fp32"], torch.float32)):
        out = tmp_path / f"m_{dtype}"
        assert convert.main(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(out),
                             *argv]) == 0
        assert stored(out) == dtype
    write_hf_model(tmp_path / "hf32", small_hf_config(), dtype=torch.float32, shards=1)
    assert stored(convert.import_from_hf(tmp_path / "hf32", tmp_path / "m32")) == torch.float32


def test_the_byte_tokenizer_of_an_export_pads_a_batch_for_generation(exported):
    """It padded on the right: generate of a padded batch continued the padding (transformers
    warned), not the shorter prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert tokenizer.padding_side == "left"
    prompts, greedy = ["Four score and seven", "We"], dict(do_sample=False, max_new_tokens=6)
    with torch.no_grad():
        alone = [model.generate(**tokenizer([p], return_tensors="pt"), **greedy)[0, -6:]
                 for p in prompts]
        batch = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), **greedy)
    assert torch.equal(batch[:, -6:], torch.stack(alone))


def test_the_byte_tokenizer_of_an_export_truncates_to_the_models_context(exported):
    """Its model_max_length was 1e9: truncation=True kept a prompt longer than the model's
    max_position_embeddings."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    context = json.loads((exported / "config.json").read_text())["max_position_embeddings"]
    assert tokenizer.model_max_length == context == SEQ
    assert len(tokenizer("word " * 100, truncation=True)["input_ids"]) == context


@pytest.mark.parametrize("changes", [
    dict(first_k_dense_replace=1, moe_layer_freq=2, num_hidden_layers=4),
    dict(n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None,
         moe_intermediate_size=None, first_k_dense_replace=0),
    dict(norm_topk_prob=True, seq_aux=False, aux_loss_alpha=0.0, n_shared_experts=0,
         first_k_dense_replace=0),
    dict(rope_theta=500000.0),
    dict(rope_scaling={"type": "linear", "factor": 1.0}),  # a no-op: positions / 1
], ids=["moe-every-2nd-layer", "dense", "renormalised-no-shared", "rope-theta-500000",
        "rope-scaling-linear-1"])
def test_other_layer_layouts_round_trip(rt, tmp_path, changes):
    """HF -> Megatron -> HF is bit-exact, the imported model's forward is HF's, and the run.yaml
    of the import keeps the RoPE base (rope_theta)."""
    config = scaled_16b_config(**{"n_routed_experts": 8, "num_experts_per_tok": 2,
                                  "torch_dtype": "float32", **changes})
    source = write_hf_model(tmp_path / "hf", config, dtype=torch.float32, shards=1)
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "megatron")
    run, model = load_single_rank(save)
    assert run.model.rotary_base == config["rope_theta"]
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(4))
    diff = (megatron_logits(model, tokens)[..., :300] - hf_logits(tmp_path / "hf", tokens))
    assert diff.abs().max().item() <= 1e-4
    back = convert.export_to_hf(save, tmp_path / "back", tokenizer=False)
    assert_bit_exact(source, read_tensors(back))
    exported = json.loads((back / "config.json").read_text())
    for key in ("n_routed_experts", "moe_layer_freq", "norm_topk_prob", "seq_aux",
                "aux_loss_alpha", "n_shared_experts", "first_k_dense_replace", "rope_theta"):
        if config.get(key) is not None or key in ("n_routed_experts",):
            assert exported[key] == config[key], key


def test_rope_base_of_a_config_in_transformers_5_style(rt, tmp_path):
    """A config.json re-saved in transformers 5's style keeps the RoPE base in rope_parameters
    only: the import and the Hugging Face model read it there (both used 10000, another model),
    and a config.json with two different bases is refused."""
    plain = scaled_16b_config(n_routed_experts=8, num_experts_per_tok=2, torch_dtype="float32",
                              rope_theta=500000.0)
    write_hf_model(tmp_path / "plain", plain, dtype=torch.float32, shards=1)
    shutil.copytree(tmp_path / "plain", tmp_path / "hf")
    styled = {k: v for k, v in plain.items() if k != "rope_theta"}
    styled["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(styled))
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "megatron")
    run, model = load_single_rank(save)
    assert run.model.rotary_base == 500000.0
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(4))
    reference = hf_logits(tmp_path / "plain", tokens)
    assert torch.equal(hf_logits(tmp_path / "hf", tokens), reference)
    assert (megatron_logits(model, tokens)[..., :300] - reference).abs().max().item() <= 1e-4

    styled["rope_theta"] = 10000.0
    (tmp_path / "hf" / "config.json").write_text(json.dumps(styled))
    with pytest.raises(ConversionError, match=r"rope_theta=10000\.0 and rope_parameters\."
                                              r"rope_theta=500000\.0, two RoPE bases"):
        convert.import_from_hf(tmp_path / "hf", tmp_path / "other")


def test_hf_config_reads_linear_scaling_from_rope_parameters():
    from dsmoe_megatron.hf.configuration_deepseek import DeepseekConfig

    config = DeepseekConfig(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                             "rope_theta": 500000.0})
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="only 'linear'"):
        DeepseekConfig(rope_parameters={"rope_type": "yarn", "factor": 2.0})
    # null, as a config.json may write an unset field, is no base of its own.
    assert DeepseekConfig(rope_theta=None, rope_parameters={"rope_theta": 5e5}).rope_theta == 5e5
    with pytest.raises(ValueError, match="two RoPE bases"):
        DeepseekConfig(rope_theta=1e4, rope_parameters={"rope_theta": 5e5})


def test_top_1_routing_with_norm_topk_prob_imports_unrenormalised(rt, tmp_path):
    """norm_topk_prob does nothing at top_k 1 (HF renormalises for top_k > 1 only): the import
    was refused with Megatron's 'Please use --moe-router-pre-softmax when topk is 1'."""
    config = scaled_16b_config(n_routed_experts=8, num_experts_per_tok=1, norm_topk_prob=True,
                               torch_dtype="float32")
    source = write_hf_model(tmp_path / "hf", config, dtype=torch.float32, shards=1)
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "megatron")
    run, model = load_single_rank(save)
    assert run.model.moe_router_topk == 1 and run.model.moe_router_pre_softmax
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(4))
    diff = (megatron_logits(model, tokens)[..., :300] - hf_logits(tmp_path / "hf", tokens))
    assert diff.abs().max().item() <= 1e-4
    back = convert.export_to_hf(save, tmp_path / "back", tokenizer=False)
    assert_bit_exact(source, read_tensors(back))
    assert json.loads((back / "config.json").read_text())["norm_topk_prob"] is False


def test_first_k_dense_replace_beyond_the_last_layer_imports_as_every_layer_dense(rt, tmp_path):
    """HF and the released code take first_k_dense_replace > num_hidden_layers (every layer
    dense); the import was refused with Megatron's 'moe_first_k_dense=5 must be between 0 and
    num_layers (3)'."""
    config = scaled_16b_config(n_routed_experts=8, first_k_dense_replace=5, torch_dtype="float32")
    source = write_hf_model(tmp_path / "hf", config, dtype=torch.float32, shards=1)
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "megatron")
    run, model = load_single_rank(save)
    assert run.model.moe_layer_pattern() == [False] * 3
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(4))
    diff = (megatron_logits(model, tokens)[..., :300] - hf_logits(tmp_path / "hf", tokens))
    assert diff.abs().max().item() <= 1e-4
    back = convert.export_to_hf(save, tmp_path / "back", tokenizer=False)
    assert_bit_exact(source, read_tensors(back))


def small_hf_config(**changes) -> dict:
    return scaled_16b_config(**{"num_hidden_layers": 2, "n_routed_experts": 4,
                                "num_experts_per_tok": 2, "torch_dtype": "float32", **changes})


def edit_tensors(directory: Path, edit) -> None:
    """Apply edit(dict) to the tensors of a single-file HF directory."""
    [path] = directory.glob("*.safetensors")
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    index = directory / "model.safetensors.index.json"
    weight_map = {name: path.name for name in tensors}
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
     r"missing tensors \(1\): model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     r"unexpected tensors \(1\): model\.layers\.0\.self_attn\.q_proj\.bias"),
    (lambda t: t.update({"model.layers.1.mlp.gate.weight": torch.zeros(5, 64)}),
     r"shape mismatch \(1\): model\.layers\.1\.mlp\.gate\.weight: \(5, 64\), expected \(4, 64\)"),
], ids=["missing", "extra", "shape"])
def test_import_names_bad_tensors(rt, tmp_path, edit, message):
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    edit_tensors(tmp_path / "hf", edit)
    with pytest.raises(ConversionError, match=message):
        convert.import_from_hf(tmp_path / "hf", tmp_path / "megatron")
    assert not (tmp_path / "megatron").exists()
    assert not (tmp_path / "megatron.partial").exists()


def test_import_ignores_rotary_buffers(rt, tmp_path):
    source = write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    edit_tensors(tmp_path / "hf", lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "megatron")
    assert_bit_exact(source, read_tensors(convert.export_to_hf(save, tmp_path / "back",
                                                                tokenizer=False)))


@pytest.mark.parametrize("changes, field", [
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(topk_method="noaux_tc", n_group=2, topk_group=1), "topk_method"),  # DeepSeek-V3's
    (dict(routed_scaling_factor=2.5), "routed_scaling_factor"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling={"type": "dynamic", "factor": 1.0}), "rope_scaling"),  # not a no-op
    (dict(rope_parameters={"rope_type": "linear", "factor": 4}), "rope_parameters"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(model_type="llama"), "model_type"),
    (dict(moe_layer_freq=0), "moe_layer_freq"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_import_refuses_unsupported_configs(tmp_path, changes, field):
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(small_hf_config(**changes)))
    # The file's path: a user converting several models learns which one is refused.
    config_path = re.escape(str(directory / "config.json"))
    with pytest.raises(ConversionError, match=f"^{config_path}: unsupported config: {field}="):
        convert.import_from_hf(directory, tmp_path / "megatron")
    assert not (tmp_path / "megatron").exists()


def test_import_notes_pretraining_tp_once(rt, tmp_path, capsys):
    write_hf_model(tmp_path / "hf", small_hf_config(pretraining_tp=2), dtype=torch.float32)
    convert.import_from_hf(tmp_path / "hf", tmp_path / "megatron", tokenizer=False)
    notes = [line for line in capsys.readouterr().err.splitlines() if "pretraining_tp" in line]
    assert notes == [f"[dsmoe-convert] note: {tmp_path / 'hf' / 'config.json'}: pretraining_tp=2 "
                     "only split matmuls; ignored"]


def test_import_path_errors(tmp_path, capsys):
    with pytest.raises(ConversionError, match="does not exist"):
        convert.import_from_hf(tmp_path / "nowhere", tmp_path / "megatron")
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(small_hf_config()))
    torch.save({}, directory / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="no safetensors weights.*pytorch_model.bin"):
        convert.import_from_hf(directory, tmp_path / "megatron")
    assert convert.main(["from-hf", "--hf", str(tmp_path / "nowhere"),
                         "--out", str(tmp_path / "megatron")]) == 2
    assert "does not exist" in capsys.readouterr().err
    ours = tmp_path / "run"  # a save directory given as --hf
    ours.mkdir()
    (ours / "latest").write_text("2")
    with pytest.raises(ConversionError, match="not a Hugging Face model directory.*to-hf exports"):
        convert.import_from_hf(ours, tmp_path / "megatron")


def test_import_refuses_architecture_overrides(tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(small_hf_config()))
    with pytest.raises(ConversionError, match="model.hidden_size=128"):
        convert.import_from_hf(directory, tmp_path / "megatron",
                               overrides=["language_model.hidden_size=128"])


def test_parse_size():
    assert convert.parse_size("5GB") == 5 * 10**9
    assert convert.parse_size("60KB") == 60_000
    assert convert.parse_size("1GiB") == 2**30
    assert convert.parse_size("4096") == 4096
    for bad in ("lots", "0", 0, "0.1B"):
        with pytest.raises(ConversionError, match="size"):
            convert.parse_size(bad)


# ------------------------------------------------------------------------------------------
# Streaming: the same outputs as a model built in memory, in bounded memory
# ------------------------------------------------------------------------------------------

def reference_import(hf_dir: Path, save_dir: Path, dtype: str) -> Path:
    """from-hf as it was before it streamed: the whole model built in memory, filled from the
    safetensors and saved with Megatron's own writer."""
    from dsmoe_megatron.hf.mapping import hf_dims, hf_to_megatron, normalise_megatron_names

    hf = convert.read_hf_config(hf_dir)
    run = convert.build_run_config(hf, convert._dtype_overrides(dtype))
    dims = hf_dims(hf)
    padded = padded_vocab_size(dims.vocab, run.layout.tensor)
    model = build_model(single_rank_config(run.model, run.model.params_dtype), padded,
                        run.train.seq_length, pre_process=True, post_process=True)
    own = normalise_megatron_names(model.state_dict())
    reader = SafetensorsReader(hf_dir)
    with torch.no_grad():
        for name, make in hf_to_megatron(reader.get, dims, padded).items():
            own[name].copy_(make())
    return checkpoint.save(save_dir, 0, [model])


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_streamed_import_saves_what_the_built_model_saves(rt, tmp_path, dtype):
    """Same keys, chunks, dtypes and objects, and every saved item byte for byte (fp32 source;
    bf16 rounds in the conversion)."""
    write_hf_model(tmp_path / "hf", small_hf_config(num_key_value_heads=2), dtype=torch.float32)
    streamed = convert.import_from_hf(tmp_path / "hf", tmp_path / "streamed", dtype=dtype)
    reference = reference_import(tmp_path / "hf", tmp_path / "reference", dtype)
    assert bench.same_checkpoint(checkpoint.resolve(streamed), reference)


def test_streamed_export_writes_the_tensors_of_the_loaded_model(trained, exported):
    """to-hf reads no model; its tensors are those of the model the checkpoint was saved from."""
    from dsmoe_megatron.hf.mapping import Dims, megatron_to_hf, normalise_megatron_names

    state = normalise_megatron_names(trained.model.state_dict())
    dims = Dims.from_megatron(single_rank_config(trained.run.model), VOCAB)
    expected = {name: make() for name, make in megatron_to_hf(state.__getitem__, dims).items()}
    assert_bit_exact(expected, read_tensors(exported))


def test_conversion_never_builds_transformer_engine_modules(rt, tmp_path, monkeypatch):
    """Where Transformer Engine imports, the converter's model still has the stacked expert
    weights and local modules (TE's would be weight0..N and need a GPU): both directions work
    with te_available() faked to True."""
    from dsmoe_megatron import backends, specs

    for module in (backends, specs):
        monkeypatch.setattr(module, "te_available", lambda: True)
    source = write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    save = convert.import_from_hf(tmp_path / "hf", tmp_path / "megatron")
    back = convert.export_to_hf(save, tmp_path / "back", tokenizer=False)
    assert_bit_exact(source, read_tensors(back))


# ------------------------------------------------------------------------------------------
# Bad input: one clear line, no traceback, nothing written
# ------------------------------------------------------------------------------------------

def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """dsmoe-convert's exit code and stderr (argparse's own errors exit with 2)."""
    try:
        code = convert.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def test_export_refuses_non_finite_weights_unless_allowed(rt, tmp_path, capsys):
    nan_name = "model.layers.1.mlp.experts.2.up_proj.weight"
    big_name = "model.layers.0.self_attn.q_proj.weight"  # earlier in the file: fp16 sees it first

    def spoil(tensors):
        tensors[nan_name][3, 5] = float("nan")
        tensors[big_name][0, 0] = 1e6  # finite, but not in float16

    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    edit_tensors(tmp_path / "hf", spoil)
    with pytest.MonkeyPatch.context() as patch:  # from-hf itself refuses NaN/inf weights
        patch.setattr(streaming, "check_finite", lambda *args: None)
        save = convert.import_from_hf(tmp_path / "hf", tmp_path / "megatron")
    out = tmp_path / "out"
    code, err = run_cli(["to-hf", "--checkpoint", str(save), "--out", str(out)], capsys)
    assert code == 2
    assert f"{nan_name} has 1 non-finite values" in err and "--allow-non-finite" in err
    assert not out.exists() and not out.with_name("out.partial").exists()
    code, err = run_cli(["to-hf", "--checkpoint", str(save), "--out", str(out), "--dtype",
                         "fp16"], capsys)
    assert code == 2 and f"{big_name}: 1 of" in err and "overflow float16" in err
    assert run_cli(["to-hf", "--checkpoint", str(save), "--out", str(out),
                    "--allow-non-finite"], capsys)[0] == 0
    tensors = read_tensors(out)
    assert torch.isnan(tensors[nan_name][3, 5]) and torch.isfinite(tensors[big_name]).all()


def test_import_refuses_non_finite_weights_naming_tensor_and_file(rt, tmp_path, capsys):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    edit_tensors(tmp_path / "hf", lambda t: t[name].__setitem__((3, 5), float("inf")))
    [path] = (tmp_path / "hf").glob("*.safetensors")
    out = tmp_path / "m"
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(out)], capsys)
    assert code == 2, err
    [line] = [x for x in err.splitlines() if x.startswith("dsmoe-convert: error: ")]
    assert f"{name} has 1 non-finite values (NaN or inf) of {8 * 64} in {path}" in line
    assert not out.exists() and not out.with_name("m.partial").exists()


def test_import_refuses_weights_that_overflow_fp16_naming_tensor_and_file(rt, tmp_path, capsys):
    """--dtype fp16 of bf16 weights beyond fp16's range (65504) wrote inf into the checkpoint
    without a word: the run from it diverged at once, and to-hf called the weights broken."""
    name = "model.layers.0.mlp.down_proj.weight"
    write_hf_model(tmp_path / "hf", small_hf_config(torch_dtype="bfloat16"), shards=1)
    edit_tensors(tmp_path / "hf", lambda t: t[name].__setitem__((3, 5), 1e6))
    [path] = (tmp_path / "hf").glob("*.safetensors")
    out = tmp_path / "m"
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(out),
                         "--dtype", "fp16"], capsys)
    assert code == 2, err
    [line] = [x for x in err.splitlines() if x.startswith("dsmoe-convert: error: ")]
    assert line.endswith(f"{name} in {path}: 1 of {64 * 96} values overflow float16 (the "
                         "largest is 9.994e+05); import with --dtype bf16 or fp32"), line
    assert not out.exists() and not out.with_name("m.partial").exists()
    assert convert.main(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(out)]) == 0


@pytest.mark.parametrize("change, message", [
    ([1, 2], "must hold a JSON object of model settings .*, not a list"),
    (dict(hidden_size="64"), r"hidden_size must be a positive integer, got '64' \(a string\)"),
    (dict(num_hidden_layers=2.5), r"num_hidden_layers must be a positive integer, got 2.5"),
    (dict(num_attention_heads=-4), r"num_attention_heads must be a positive integer, got -4"),
    (dict(n_routed_experts=True), r"n_routed_experts must be an integer >= 0 or null, got True"),
    (dict(rms_norm_eps="x"), r"rms_norm_eps must be a positive number, got 'x'"),
    (dict(rope_theta={}), r"rope_theta must be a positive number, got \{\} \(an object\)"),
    (dict(norm_topk_prob="yes"), r"norm_topk_prob must be true or false, got 'yes'"),
    (dict(eos_token_id="</s>"), r"eos_token_id must be a token id"),
    (dict(vocab_size=None), r"vocab_size must be a positive integer, got None \(null\)"),
], ids=["list", "str", "float", "negative", "bool", "eps", "theta", "flag", "token", "null"])
def test_import_names_a_config_field_of_the_wrong_type(tmp_path, capsys, change, message):
    directory = tmp_path / "hf"
    directory.mkdir()
    config = change if isinstance(change, list) else {**small_hf_config(), **change}
    (directory / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["from-hf", "--hf", str(directory), "--out", str(tmp_path / "m")], capsys)
    assert code == 2
    assert f"{directory / 'config.json'}" in err and re.search(message, err), err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("indexed", [True, False], ids=["index", "no-index"])
def test_import_names_a_truncated_safetensors_file(tmp_path, capsys, indexed):
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=2)
    if not indexed:
        (tmp_path / "hf" / "model.safetensors.index.json").unlink()
    path = tmp_path / "hf" / "model-00002-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 2 and str(path) in err and "truncated" in err
    assert not (tmp_path / "m").exists()


def test_export_of_a_checkpoint_with_a_damaged_run_yaml_points_to_an_earlier_one(tmp_path):
    """A checkpoint's run.yaml that was not UTF-8 or not YAML stopped to-hf with the advice for
    a config given on the command line ('give the path of a run config YAML'), or none."""
    ckpt = tmp_path / "iter_0000004"
    ckpt.mkdir()
    for damage in (b"\xff\xfe", b"a: [\n"):
        (ckpt / "run.yaml").write_bytes(damage)
        with pytest.raises(ConversionError,
                           match=r"^\S+run.yaml cannot be read .*; restore it, or resume from an "
                                 r"earlier checkpoint \(complete ones beside it: none\): .*"
                                 r"--checkpoint DIR to dsmoe-convert"):
            convert.read_checkpoint_run(ckpt)


@pytest.mark.parametrize("name", ["model.layers.9.mlp.gate.weight", "lm_head.weight"],
                         ids=["unknown", "moved"])
def test_import_names_an_index_entry_its_shard_does_not_hold(tmp_path, capsys, name):
    """An index placing a tensor in a shard without it stopped from-hf with safetensors' 'File
    does not contain tensor', naming neither the index nor what to do."""
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=2)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    entries = json.loads(index.read_text())
    entries["weight_map"][name] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(entries))
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 2 and "Traceback" not in err, err
    assert (f"{index} places tensor {name} in model-00001-of-00002.safetensors, which does not "
            "hold it" in err and "download them again" in err), err
    assert not (tmp_path / "m").exists()


def test_import_refuses_a_tensor_in_two_files_without_an_index(tmp_path, capsys):
    """A stray copy next to model.safetensors (model_old.safetensors) was read for the tensors
    both hold, without a word: transformers loads model.safetensors, the import the other."""
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    (tmp_path / "hf" / "model.safetensors.index.json").unlink()
    [shard] = (tmp_path / "hf").glob("*.safetensors")
    shard.rename(tmp_path / "hf" / "model.safetensors")
    save_file({"lm_head.weight": torch.zeros(300, 64)},
              str(tmp_path / "hf" / "model_old.safetensors"))
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 2 and "Traceback" not in err, err
    assert ("lm_head.weight is in both model.safetensors and model_old.safetensors, and "
            f"{tmp_path / 'hf'} has no model.safetensors.index.json" in err
            and "move the other file out" in err), err
    assert not (tmp_path / "m").exists()


def test_import_names_an_index_that_is_not_text(tmp_path, capsys):
    """A model.safetensors.index.json of bytes that are not UTF-8 (a damaged download) stopped
    from-hf with a UnicodeDecodeError traceback."""
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=2)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    index.write_bytes(b"\xff\xfe{")
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 2 and f"{index} is not a safetensors index" in err, err
    assert "replace it with a complete copy" in err and "Traceback" not in err, err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("step", ["tensors", "run.yaml"])
def test_import_onto_a_full_disk_is_one_line_about_out(rt, tmp_path, capsys, monkeypatch, step):
    """The disk fills while the tensors or, last, run.yaml are written: one line that names
    --out (not the checkpoint writer's '.partial' save of 'iteration 0'), and no --out."""
    write_hf_model(tmp_path / "hf", small_hf_config(), dtype=torch.float32, shards=1)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if step == "tensors":
        def save(self, *args):
            raise full
        monkeypatch.setattr(streaming.StreamingSaveStrategy, "save", save)
    else:
        write_text = Path.write_text

        def save(path, *args, **kwargs):
            if path.name == checkpoint.RUN_CONFIG_NAME:
                raise full
            return write_text(path, *args, **kwargs)
        monkeypatch.setattr(Path, "write_text", save)
    out = tmp_path / "m"
    code, err = run_cli(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(out)], capsys)
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith(f"dsmoe-convert: error: from-hf stopped, nothing at --out {out} "
                           "changed: No space left on device; "), line
    assert "MiB free" in line and "iteration" not in line and ".partial" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("flag, value", [
    ("--tensor-model-parallel-size", "0"), ("--tensor-model-parallel-size", "-2"),
    ("--tensor-model-parallel-size", "two"), ("--pipeline-model-parallel-size", "0"),
    ("--expert-model-parallel-size", "0"), ("--expert-tensor-parallel-size", "0"),
    ("--virtual-pipeline-model-parallel-size", "0"),
])
def test_from_hf_refuses_layout_flags_below_one(tmp_path, capsys, flag, value):
    code, err = run_cli(["from-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "m"), flag,
                         value], capsys)
    assert code == 2 and f"argument {flag}: must be a positive integer" in err


@pytest.mark.parametrize("flag, value, config, message", [
    ("--tensor-model-parallel-size", "3", {}, "multiple of tensor_model_parallel_size"),
    ("--tensor-model-parallel-size", "3", dict(hidden_size=96, num_attention_heads=12,
                                                num_key_value_heads=12, moe_intermediate_size=24),
     "--tensor-model-parallel-size: tensor_model_parallel_size=3 must divide 1024"),
    ("--expert-model-parallel-size", "3", {}, "choose an EP size that divides 4"),
    ("--pipeline-model-parallel-size", "5", {}, "does not split evenly over 5 pipeline stages"),
], ids=["tp-heads", "tp-vocab", "ep", "pp"])
def test_from_hf_refuses_layouts_the_model_cannot_take(tmp_path, capsys, flag, value, config,
                                                       message):
    (tmp_path / "config.json").write_text(json.dumps(small_hf_config(**config)))
    code, err = run_cli(["from-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "m"), flag,
                         value], capsys)
    assert code == 2 and message in err
    assert flag in err or "layout flags (--tensor/--pipeline/--expert-model-parallel-size)" in err
    assert not (tmp_path / "m").exists()


def test_export_names_a_damaged_checkpoint(rt, trained, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint.resolve(trained.save), damaged)
    next(damaged.glob("*.distcp")).unlink()
    code, err = run_cli(["to-hf", "--checkpoint", str(damaged), "--out", str(tmp_path / "hf")],
                        capsys)
    assert code == 2 and str(damaged) in err
    assert not (tmp_path / "hf").exists()
    # A complete-looking save never renamed from .partial is not called a checkpoint either.
    unfinished = tmp_path / "run" / "iter_0000002.partial"
    shutil.copytree(checkpoint.resolve(trained.save), unfinished)
    code, err = run_cli(["to-hf", "--checkpoint", str(unfinished), "--out", str(tmp_path / "hf")],
                        capsys)
    assert code == 2 and "unfinished save of an interrupted run" in err
    assert f"pass the save directory {unfinished.parent}" in err


def test_export_names_the_garbled_file_in_one_line(rt, trained, tmp_path, capsys):
    """A .distcp file of the right size whose bytes no longer unpickle was reported with torch's
    multi-paragraph weights_only essay (advising to load the file untrusted) and no file name."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint.resolve(trained.save), damaged)
    for shard in damaged.glob("*.distcp"):
        shard.write_bytes(b"\xff" * shard.stat().st_size)
    code, err = run_cli(["to-hf", "--checkpoint", str(damaged), "--out", str(tmp_path / "hf")],
                        capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"from {damaged}/__" in err and ".distcp: UnpicklingError" in err
    assert "weights_only" not in err and "export another iteration" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("option, message", [
    (["--set", "num_moe_experts=16"], "--set num_moe_experts=16 gives num_moe_experts=16, but "
     "the checkpoint's {} says 8"),
    (["--set", "moe_router_topk=5"], "--set moe_router_topk=5 gives moe_router_topk=5, but the "
     "checkpoint's {} says 3"),
    (["--set", "vocab_size=300"], "gives vocab_size=300, but the checkpoint's {} says 259"),
    (["--config", str(REPO / "yaml_configs/tiny.yaml")],
     f"--config {REPO / 'yaml_configs/tiny.yaml'} gives "),
], ids=["experts", "topk", "vocab", "config"])
def test_to_hf_options_may_not_change_the_model_run_yaml_defines(trained, tmp_path, capsys,
                                                                  option, message):
    out = tmp_path / "hf"
    code, err = run_cli(["to-hf", "--checkpoint", str(trained.save), "--out", str(out),
                         *option], capsys)
    run_yaml = checkpoint.resolve(trained.save) / checkpoint.RUN_CONFIG_NAME
    assert code == 2 and message.format(run_yaml) in err, err
    assert "defines the model it was trained as" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_to_hf_options_that_keep_the_model_of_run_yaml_apply(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_yaml = checkpoint.resolve(trained.save) / checkpoint.RUN_CONFIG_NAME
    (tmp_path / "same.yaml").write_text(run_yaml.read_text())
    for option in (["--set", "max_position_embeddings=64"], ["--config", "same.yaml", "--set",
                                                              "max_position_embeddings=64"]):
        out = tmp_path / option[0].strip("-")
        assert convert.main(["to-hf", "--checkpoint", str(trained.save), "--out", str(out),
                             *option]) == 0
        config = json.loads((out / "config.json").read_text())
        assert (config["max_position_embeddings"], config["num_experts_per_tok"],
                config["n_routed_experts"]) == (64, 3, 8)


def test_a_config_that_does_not_fit_a_megatron_lm_checkpoint_names_both_shapes(
        trained, tmp_path, capsys):
    """A checkpoint of Megatron-LM's loop (no run.yaml) with a --set that contradicts its
    tensors: one line with the checkpoint's shape beside the config's (was an IndexError)."""
    import shutil

    ckpt = tmp_path / "megatron_lm"
    shutil.copytree(checkpoint.resolve(trained.save), ckpt)
    (ckpt / checkpoint.RUN_CONFIG_NAME).rename(tmp_path / "run.yaml")
    code, err = run_cli(["to-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"),
                         "--config", str(tmp_path / "run.yaml"), "--set", "num_moe_experts=16"],
                        capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "decoder.layers.1.mlp.router.weight: (8, 32), expected (16, 32)" in err, err
    assert "decoder.layers.1.mlp.experts.up_proj: (8, 16, 32), expected (16, 16, 32)" in err, err
    assert not (tmp_path / "hf").exists()


def test_a_megatron_lm_checkpoint_exports_the_context_length_it_was_trained_with(
        trained, tmp_path, monkeypatch):
    """Megatron-LM keeps --seq-length and --max-position-embeddings in its checkpoint, but the
    export wrote the --config YAML's (tiny.yaml's 128 for a run trained at 64) into config.json
    and the tokenizer's model_max_length without a word. Now the trained ones, unless --set
    gives another (as for a checkpoint with its run.yaml)."""
    from megatron.core import dist_checkpointing

    ckpt = tmp_path / "megatron_lm"
    shutil.copytree(checkpoint.resolve(trained.save), ckpt)
    (ckpt / checkpoint.RUN_CONFIG_NAME).rename(tmp_path / "run.yaml")  # seq_length 16
    args = SimpleNamespace(seq_length=8, max_position_embeddings=8)
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", lambda _: {"args": args})
    for sets, length in (([], 8), (["--set", "max_position_embeddings=64"], 64)):
        out = tmp_path / f"hf{length}"
        assert convert.main(["to-hf", "--checkpoint", str(ckpt), "--out", str(out), "--config",
                             str(tmp_path / "run.yaml"), *sets]) == 0
        assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == length
        tokenizer = json.loads((out / "tokenizer_config.json").read_text())
        assert tokenizer["model_max_length"] == length
    # fewer positions than it was trained on were exported as the trained ones, without a word
    args.seq_length = args.max_position_embeddings = 32
    with pytest.raises(ConversionError, match=r"was trained with seq_length=32 \(the Megatron-LM "
                       r"arguments it keeps\), but --set gives max_position_embeddings=20, fewer "
                       r"positions: give at least 32, or --set seq_length too$"):
        convert.read_checkpoint_run(ckpt, tmp_path / "run.yaml", ["max_position_embeddings=20"])


@pytest.mark.distributed
def test_from_hf_checkpoint_loads_on_tp2_pp2_ep2_and_exports_from_there(exported, tmp_path):
    """from-hf's streamed checkpoint loads on 8 ranks (TP2 x PP2 x EP2); saved from there and
    exported again, it gives the single-rank export bit for bit."""
    from distributed import run_on_ranks
    from dsmoe_megatron.runtime import ParallelLayout
    from parallel_cases import resave_run_checkpoint

    imported = convert.import_from_hf(exported, tmp_path / "imported")
    layout = ParallelLayout(tensor=2, pipeline=2, expert=2)
    shards = run_on_ranks(resave_run_checkpoint, 8, layout=layout,
                          args=(str(imported), str(tmp_path / "tp2pp2ep2"), layout))
    assert all(s == {"layers": 2, "experts": 4} for s in shards)  # really split 2 x 2 ways
    again = convert.export_to_hf(tmp_path / "tp2pp2ep2", tmp_path / "hf", dtype="fp32")
    assert_bit_exact(read_tensors(exported), read_tensors(again))


# ------------------------------------------------------------------------------------------
# Bounded memory: a model larger than the memory the converting process may allocate
# ------------------------------------------------------------------------------------------

CAPPED = """
import re, resource, sys
import torch
from dsmoe_megatron import runtime
from dsmoe_megatron.convert import main
runtime.initialize()  # the converter reuses it; its gloo threads and buffers are not the model's
torch.ones(2**20).sum()  # start the intra-op thread pool
# From here on the process may allocate at most CAP more bytes of data (RLIMIT_DATA counts
# malloc'd and anonymous mmap'd memory, not the mapped safetensors files).
data = int(re.search(r"VmData:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (data + int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


def test_both_directions_convert_a_model_larger_than_the_memory_cap(tmp_path):
    """A 10-layer model of ~640 MB of bf16 weights converts both ways in a process that may
    allocate only 300 MB beyond its start-up (the whole model built in memory would not fit;
    with a 20 MB cap the conversion fails), and the round trip is bit-exact."""
    config = bench.synthetic_config(10)
    weights = bench.parameter_count(config) * 2
    cap = 300 * 2**20
    assert weights > 2 * cap
    bench.write_synthetic_hf(tmp_path / "hf", config)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}

    def capped(*argv: str) -> None:
        proc = subprocess.run([sys.executable, "-c", CAPPED, str(cap), *argv], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    capped("from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "megatron"),
           "--dtype", "bf16")
    capped("to-hf", "--checkpoint", str(tmp_path / "megatron"), "--out", str(tmp_path / "back"),
           "--max-shard-size", "100MB")
    assert_bit_exact(read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "back"))


def test_export_of_a_dsmoe_train_checkpoint_with_optimizer_state(tmp_path):
    """What users export: a checkpoint dsmoe-train wrote, with Megatron's chained optimizer state
    (chained_<i>.optimizer.*) beside the model tensors; every HF tensor comes out, and the
    optimizer's tensors are not taken for model ones."""
    save = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "dsmoe_megatron.train", "yaml_configs/tiny.yaml",
                    "train_iters=2", "lr_warmup_iters=1", "eval_interval=null", f"save={save}",
                    "save_interval=2", "tensorboard_dir=null"], cwd=REPO, env=env, check=True,
                   timeout=600, capture_output=True)
    ckpt = checkpoint.resolve(save)
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert any(re.match(r"chained_\d+\.optimizer\.", k) for k in keys)
    out = convert.export_to_hf(save, tmp_path / "hf", tokenizer=False)
    from dsmoe_megatron.hf.mapping import hf_dims, hf_expected_shapes

    config = json.loads((out / "config.json").read_text())
    tensors = read_tensors(out)
    expected = hf_expected_shapes(hf_dims(config))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        k: tuple(s) for k, s in expected.items()}
    assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("freq, first, hf", [
    ([0, 1, 1, 1], 0, (1, 1)),  # Megatron-LM's "[0]+[1]*N": one dense layer first
    ([0, 0, 1, 0], 0, (1, 2)),  # MoE at i >= 1 with i % 2 == 0: layer 2
    ([1, 1, 1, 1], 4, (4, 1)),  # every layer dense
    (2, 1, (1, 2)),
])
def test_a_moe_layer_freq_list_exports_as_the_hf_pair_that_gives_its_pattern(freq, first, hf):
    """A moe_layer_freq list HF can express was refused ('cannot be written as HF's
    first_k_dense_replace + moe_layer_freq') unless moe_first_k_dense already was the pair's."""
    run = convert.make_run_config({**TINY, "moe_layer_freq": freq, "moe_first_k_dense": first},
                                  vocab_size=None, seq_length=SEQ)
    config = convert.hf_config_dict(run.model, VOCAB, SEQ, torch.float32)
    from dsmoe_megatron.hf.mapping import hf_dims

    assert (config["first_k_dense_replace"], config["moe_layer_freq"]) == hf
    assert list(hf_dims(config).moe_layers) == run.model.moe_layer_pattern()


def test_a_run_without_balance_loss_exports_aux_loss_alpha_0():
    """moe_router_load_balancing_type: none trains without the balance loss, whatever
    moe_aux_loss_coeff says: the export wrote that coefficient as aux_loss_alpha, so fine-tuning
    the export in transformers (and a run imported from it) added a loss the model never had."""
    run = convert.make_run_config({**TINY, "moe_router_load_balancing_type": "none"},
                                  vocab_size=None, seq_length=SEQ)
    assert run.model.moe_aux_loss_coeff == 0.01
    config = convert.hf_config_dict(run.model, VOCAB, SEQ, torch.float32)
    assert config["aux_loss_alpha"] == 0.0
    assert convert.model_fields_from_hf(config)["moe_aux_loss_coeff"] == 0.0


def test_megatron_lm_arguments_without_group_query_attention_mean_a_kv_head_per_head(
        tmp_path, monkeypatch):
    """Megatron-LM leaves num_query_groups at 1 without --group-query-attention until its first
    FLOP count, so a checkpoint saved before a step (--ckpt-convert-format torch_dist) keeps 1:
    its export was refused ('trained with num_query_groups=1 ... use --set
    num_query_groups=1'). The heads are what it was trained with; real GQA is still checked."""
    from megatron.core import dist_checkpointing

    run = convert.make_run_config({**TINY, "num_query_groups": None}, vocab_size=None,
                                  seq_length=SEQ)
    args = SimpleNamespace(group_query_attention=False, num_query_groups=1, num_attention_heads=4,
                           num_layers=4, hidden_size=32)
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", lambda _: {"args": args})
    convert._check_megatron_lm_arguments(run, tmp_path)
    args.group_query_attention, args.num_query_groups = True, 2
    with pytest.raises(ConversionError, match="trained with num_query_groups=2"):
        convert._check_megatron_lm_arguments(run, tmp_path)


def test_megatron_lm_arguments_give_the_shared_experts_by_width(tmp_path, monkeypatch):
    """A run given its shared experts as pretrain_gpt.py's width
    (--moe-shared-expert-intermediate-size 32 over --moe-ffn-hidden-size 16: 2) keeps no count:
    an export with another count was refused only by the tensors' shapes. Now by name, with the
    --set that fits."""
    from megatron.core import dist_checkpointing

    run = convert.make_run_config(TINY, vocab_size=None, seq_length=SEQ)  # 1 shared expert
    args = SimpleNamespace(moe_shared_expert_intermediate_size=32, moe_ffn_hidden_size=16,
                           moe_num_shared_experts=None)
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", lambda _: {"args": args})
    with pytest.raises(ConversionError, match="trained with moe_num_shared_experts=2 .*"
                                              "use --set moe_num_shared_experts=2"):
        convert._check_megatron_lm_arguments(run, tmp_path)
    args.moe_shared_expert_intermediate_size = 16
    convert._check_megatron_lm_arguments(run, tmp_path)
    # A count given otherwise (DSMOE_NUM_SHARED_EXPERTS) leaves the width unset: not checked.
    args.moe_shared_expert_intermediate_size = None
    convert._check_megatron_lm_arguments(run, tmp_path)


def test_a_checkpoint_in_megatron_lms_torch_format_is_named_with_the_way_to_convert_it(
        tmp_path, capsys):
    """Megatron-LM's --ckpt-format torch (mp_rank_*/model_optim_rng.pt) was called an incomplete
    checkpoint with metadata.json missing, and the advice was to resume from an earlier one."""
    save = tmp_path / "megatron_lm"
    (save / "iter_0000001" / "mp_rank_00").mkdir(parents=True)
    (save / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"")
    (save / "latest_checkpointed_iteration.txt").write_text("1")
    code, err = run_cli(["to-hf", "--checkpoint", str(save), "--out", str(tmp_path / "hf"),
                         "--config", str(REPO / "yaml_configs/tiny.yaml")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "Megatron-LM's torch format" in err and "--ckpt-convert-format torch_dist" in err
    assert "earlier checkpoint" not in err


@pytest.mark.parametrize("field, value", [
    ("glu_linear_offset", 1.0), ("activation_func_clamp_value", 5.0), ("window_size", (4, 0)),
    ("no_rope_freq", 2), ("qk_l2_norm", True), ("attention_output_gate", True),
    ("multi_latent_attention", True), ("experimental_attention_variant", "gated_delta_net"),
    ("use_mup", True)])
def test_export_refuses_what_the_hf_model_does_not_compute(field, value):
    """Each of these Megatron settings trains a model the HF deepseek code does not compute (a
    sliding window, layers without RoPE, another attention); the export wrote config.json
    without it, a model that loads and generates other text, without a word."""
    import copy

    from dsmoe_megatron.hf.mapping import check_exportable

    from common import tiny_config

    cfg = tiny_config(moe=False)
    check_exportable(cfg)
    changed = copy.copy(cfg)
    setattr(changed, field, value)
    with pytest.raises(ConversionError, match=f"unsupported config: {field}="):
        check_exportable(changed)


def test_a_hub_model_id_given_as_hf_says_to_download_it(tmp_path, monkeypatch):
    """--hf deepseek-ai/deepseek-moe-16b-base (the model's name on the Hub) said only that the
    directory does not exist."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError) as err:
        convert.import_from_hf("deepseek-ai/deepseek-moe-16b-base", tmp_path / "megatron")
    assert str(err.value).endswith(
        "does not exist (--hf); --hf takes a local directory: download a model of the Hugging "
        "Face Hub first (hf download deepseek-ai/deepseek-moe-16b-base --local-dir DIR), then "
        "pass --hf DIR")
    with pytest.raises(ConversionError) as err:
        convert.import_from_hf(tmp_path / "a" / "b" / "c", tmp_path / "megatron")
    assert "hf download" not in str(err.value)


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "config.json",
                                  "model-00001-of-00002.safetensors"])
def test_a_file_of_the_model_given_as_hf_names_its_directory(tmp_path, name):
    """--hf pointed at a file of the download (its index, config.json, a shard) said that the
    directory does not exist, of a file that does."""
    write_hf_model(tmp_path / "hf", small_hf_config())
    with pytest.raises(ConversionError) as err:
        convert.import_from_hf(tmp_path / "hf" / name, tmp_path / "megatron")
    assert str(err.value) == (
        f"--hf {tmp_path / 'hf' / name} is a file; --hf takes the model's directory, which "
        f"holds config.json and the safetensors files: pass --hf {tmp_path / 'hf'}")
    assert not (tmp_path / "megatron").exists()


def test_a_hub_cache_folder_given_as_hf_names_its_snapshot(tmp_path):
    """`hf download` without --local-dir keeps the model in the Hub cache, in
    models--ORG--NAME/snapshots/COMMIT; --hf of the models-- folder said only that it holds no
    config.json."""
    cache = tmp_path / "models--deepseek-ai--deepseek-moe-16b-base"
    old, new = cache / "snapshots" / "0a1b", cache / "snapshots" / "9f8e"
    for snapshot in (old, new):
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps(small_hf_config()))
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0a1b")  # the one the download named
    with pytest.raises(ConversionError) as err:
        convert.import_from_hf(cache, tmp_path / "megatron")
    assert str(err.value) == (
        f"{cache / 'config.json'} is missing, so {cache} is not a Hugging Face model directory "
        f"(--hf); it is the Hugging Face cache's folder of the model: pass its snapshot, --hf "
        f"{old}")
    (cache / "refs" / "main").unlink()
    os.utime(old, (1, 1))  # without refs/main: the newest snapshot
    with pytest.raises(ConversionError, match=re.escape(f"pass its snapshot, --hf {new}")):
        convert.import_from_hf(cache, tmp_path / "megatron")


def test_the_readme_downloads_the_model_it_converts():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    local = re.search(r"^hf download deepseek-ai/deepseek-moe-16b-base --local-dir (\S+)", readme,
                      re.M)
    assert local and readme.index(f"from-hf --hf {local.group(1)} ") > local.end()
