"""Hugging Face DeepSeekMoE config/modeling files: released-config compatibility, remote-code loading,
and numerics against independent plain-PyTorch references (tiny fp32 models on CPU)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers.cache_utils import DynamicCache, StaticCache  # noqa: E402

from dsmoe_megatron.hf import AUTO_MAP, write_hf_remote_code  # noqa: E402
from dsmoe_megatron.hf.configuration_deepseek import DeepseekConfig  # noqa: E402
from dsmoe_megatron.hf.modeling_deepseek import (  # noqa: E402
    DeepseekForCausalLM, DeepseekMoE, apply_rotary, rotary_cos_sin)

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek_moe_16b_config.json"


def tiny_config(**overrides) -> DeepseekConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # Larger than the real 0.02 so random logits are far from ties and greedy decoding is stable.
        initializer_range=0.2,
        dtype="float32",
    )
    fields.update(overrides)
    return DeepseekConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> DeepseekForCausalLM:
    torch.manual_seed(seed)
    return DeepseekForCausalLM(tiny_config(**overrides)).eval()


def test_released_16b_config_loads():
    config = DeepseekConfig.from_pretrained(FIXTURE)
    expected = dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        norm_topk_prob=False,
        scoring_func="softmax",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000,
        rope_scaling=None,
        bos_token_id=100000,
        eos_token_id=100001,
        tie_word_embeddings=False,
        attention_bias=False,
        # Omitted from the released config.json: defaults of the released code.
        aux_loss_alpha=0.001,
        seq_aux=True,
    )
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.model_type == "deepseek"
    assert config.dtype == torch.bfloat16
    assert config.auto_map == AUTO_MAP
    assert [config.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert not DeepseekConfig(n_routed_experts=None).is_moe_layer(5)
    assert [DeepseekConfig(moe_layer_freq=2, first_k_dense_replace=1).is_moe_layer(i) for i in range(5)] == [
        False, False, True, False, True,
    ]


def test_config_fills_derived_fields_and_refuses_other_scoring():
    config = DeepseekConfig(num_attention_heads=8, hidden_size=64)
    assert (config.num_key_value_heads, config.hidden_size, config.num_hidden_layers) == (8, 64, 28)
    assert DeepseekConfig(num_attention_heads=8, num_key_value_heads=2).num_key_value_heads == 2
    with pytest.raises(ValueError, match="scoring_func 'sigmoid'"):
        DeepseekConfig(scoring_func="sigmoid")
    # The released code's dynamic scaling is refused on load, not at the first forward.
    with pytest.raises(ValueError, match="unsupported rope_scaling .*'dynamic'"):
        DeepseekConfig(rope_scaling={"type": "dynamic", "factor": 2.0})
    assert DeepseekConfig(rope_scaling={"type": "linear", "factor": 2.0}).rope_scaling["factor"] == 2.0


def test_state_dict_names_match_release():
    model = tiny_model()
    names = set(model.state_dict())
    layer = "model.layers.{}."
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {layer.format(i) + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}
        expected |= {layer.format(i) + f"self_attn.{p}_proj.weight" for p in "qkvo"}
    expected |= {layer.format(0) + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    expected.add(layer.format(1) + "mlp.gate.weight")
    for p in ("gate", "up", "down"):
        expected.add(layer.format(1) + f"mlp.shared_experts.{p}_proj.weight")
        expected |= {layer.format(1) + f"mlp.experts.{e}.{p}_proj.weight" for e in range(4)}
    assert names == expected
    moe = model.model.layers[1].mlp
    assert moe.gate.weight.shape == (4, 32)
    assert moe.shared_experts.up_proj.weight.shape == (16, 32)


def test_remote_code_roundtrip_offline(tmp_path):
    model = tiny_model()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    write_hf_remote_code(checkpoint)
    assert json.loads((checkpoint / "config.json").read_text())["auto_map"] == AUTO_MAP

    input_ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    # A fresh process, run outside the repo, proves the copied files need nothing but torch and transformers.
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        model, info = AutoModelForCausalLM.from_pretrained(
            {str(checkpoint)!r}, trust_remote_code=True, output_loading_info=True
        )
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(model).__name__ == "DeepseekForCausalLM"
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            logits = model.eval()(torch.load({str(tmp_path / "input_ids.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    # Only the directory of the transformers under test (another version's, in test_hf_transformers_versions).
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               PYTHONPATH=str(Path(transformers.__file__).parents[1]))
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, timeout=120)

    with torch.no_grad():
        expected = model(input_ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def swiglu_reference(x, mlp):
    gate = x @ mlp.gate_proj.weight.T
    up = x @ mlp.up_proj.weight.T
    return (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.T


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_moe_matches_per_token_loop(norm_topk_prob):
    torch.manual_seed(0)
    config = tiny_config(norm_topk_prob=norm_topk_prob, initializer_range=0.02)
    moe = DeepseekMoE(config).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        actual, aux_loss = moe(x)
        assert aux_loss is None  # in training mode only

        expected = torch.empty_like(x)
        for b in range(2):
            for t in range(5):
                token = x[b, t]
                probs = torch.softmax(moe.gate.weight @ token, dim=0)
                chosen = sorted(range(4), key=lambda e: -probs[e].item())[:2]
                total = sum(probs[e] for e in chosen) if norm_topk_prob else 1.0
                out = swiglu_reference(token, moe.shared_experts)
                for e in chosen:
                    out = out + probs[e] / total * swiglu_reference(token, moe.experts[e])
                expected[b, t] = out
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_dense_forward_matches_plain_pytorch():
    model = tiny_model(num_hidden_layers=1, initializer_range=0.02)
    config = model.config
    input_ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    eps, heads, head_dim, seq = config.rms_norm_eps, 4, 8, 7

    def rmsnorm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # x: [batch, heads, seq, head_dim]; rotate pairs (i, i + head_dim/2)
        half = head_dim // 2
        freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
        angle = (torch.arange(seq, dtype=torch.float64)[:, None] * freq).float()
        cos, sin = angle.cos(), angle.sin()
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def split_heads(x):
        return x.view(2, seq, heads, head_dim).transpose(1, 2)

    layer = model.model.layers[0]
    attn = layer.self_attn
    with torch.no_grad():
        h = model.model.embed_tokens.weight[input_ids]
        x = rmsnorm(h, layer.input_layernorm.weight)
        q = rope(split_heads(x @ attn.q_proj.weight.T))
        k = rope(split_heads(x @ attn.k_proj.weight.T))
        v = split_heads(x @ attn.v_proj.weight.T)
        scores = q @ k.transpose(-1, -2) / head_dim**0.5
        future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)
        context = (probs @ v).transpose(1, 2).reshape(2, seq, heads * head_dim)
        h = h + context @ attn.o_proj.weight.T
        h = h + swiglu_reference(rmsnorm(h, layer.post_attention_layernorm.weight), layer.mlp)
        expected = rmsnorm(h, model.model.norm.weight) @ model.lm_head.weight.T

        actual = model(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_left_padding_matches_unpadded():
    model = tiny_model()
    input_ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), input_ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        expected = model(input_ids).logits
        actual = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_packed_sequences_attend_only_within_themselves():
    """Sequences packed in one row as transformers' DataCollatorWithFlattening packs them (no attention mask,
    positions restarting at each sequence) give each sequence's own logits and loss, as transformers' models do:
    they attended to the sequences before them."""
    from transformers import DataCollatorWithFlattening

    model = tiny_model()
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, 64, (n,), generator=generator).tolist() for n in (5, 3, 6)]
    batch = DataCollatorWithFlattening()([{"input_ids": s} for s in sequences])
    assert "attention_mask" not in batch and batch["position_ids"][0, 5] == 0
    with torch.no_grad():
        packed = model(**batch)
        alone = [model(torch.tensor([s]), labels=torch.tensor([s])) for s in sequences]
    expected = torch.cat([out.logits[0] for out in alone])
    torch.testing.assert_close(packed.logits[0], expected, rtol=1e-5, atol=1e-5)
    tokens = [len(s) - 1 for s in sequences]  # the label tokens of each sequence
    loss = sum(out.loss * n for out, n in zip(alone, tokens)) / sum(tokens)
    torch.testing.assert_close(packed.loss, loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Generation with the KV cache. The reference is the model without a cache run once on each prompt alone
# (unpadded) followed by the generated tokens (teacher forcing): generate's per-step logits must match it and
# each generated token must be its greedy choice. In fp32 that is exact enough to also demand the very tokens
# of generation without a cache; in bf16 the cached and recomputed attention round differently, so the
# logits agree to a few bf16 steps and a token may differ from the recomputed one only at a near-tie.

GREEDY = dict(do_sample=False, max_new_tokens=8)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1}  # logits are ~3: a bf16 step there is 1/64
DTYPES = [torch.float32, torch.bfloat16]
# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`.
CACHE_OUTPUT = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def left_padded(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def assert_greedy(model, prompt: torch.Tensor, continuation: torch.Tensor, step_logits=None):
    """``continuation`` is the uncached model's greedy continuation of ``prompt`` alone, up to rounding."""
    tol = TOLERANCE[model.dtype]
    with torch.no_grad():
        reference = model(torch.cat([prompt, continuation])[None], use_cache=False).logits[0, len(prompt) - 1:-1]
    if step_logits is not None:
        torch.testing.assert_close(step_logits, reference, rtol=0, atol=tol)
    gap = reference.max(dim=-1).values - reference.gather(-1, continuation[:, None])[:, 0]
    assert gap.max() <= tol, f"not the greedy choice: logit below the best by {gap.tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_greedy_generation_with_cache_matches_uncached(dtype):
    model = tiny_model().to(dtype)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 64, (n,), generator=generator) for n in (7, 4, 2)]
    ids, mask = left_padded(prompts, pad=0)
    new = GREEDY["max_new_tokens"]
    caches = dict(dynamic=dict(use_cache=True), static=dict(cache_implementation="static"))
    with torch.no_grad():
        for name, cache in caches.items():
            # An unpadded prompt, then a left-padded batch in which each row continues its prompt alone.
            for rows, inputs in (([0], dict(inputs=prompts[0][None])),
                                 ([0, 1, 2], dict(inputs=ids, attention_mask=mask))):
                out = model.generate(**inputs, **cache, **GREEDY, pad_token_id=0, output_logits=True,
                                     return_dict_in_generate=True)
                step_logits = torch.stack(out.logits, dim=1)
                for row in rows:
                    assert_greedy(model, prompts[row], out.sequences[row, -new:], step_logits[row])
                if dtype == torch.float32:
                    uncached = model.generate(**inputs, use_cache=False, **GREEDY, pad_token_id=0)
                    assert torch.equal(out.sequences, uncached), name
    # Not a degenerate model: the continuations differ and use many tokens.
    continuations = {tuple(row[-new:].tolist()) for row in out.sequences}
    assert len(continuations) == len(prompts) and len(set(sum(continuations, ()))) > new


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_text_generation_pipeline_with_cache_matches_uncached(dtype, tmp_path):
    from transformers import AutoTokenizer, pipeline

    from dsmoe_megatron.tokenizer import ByteTokenizer, write_hf_tokenizer

    byte = ByteTokenizer()
    model = tiny_model(vocab_size=byte.vocab_size, pad_token_id=byte.pad, bos_token_id=byte.bos,
                       eos_token_id=byte.eod).to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(write_hf_tokenizer(tmp_path / "tokenizer"))
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "Four score and"
    with torch.no_grad():
        runs = {use_cache: generate(prompt, use_cache=use_cache, **GREEDY, return_tensors=True)[0]
                for use_cache in (True, False)}
    prompt_ids = torch.tensor(byte.tokenize(prompt))
    for run in runs.values():
        ids = torch.tensor(run["generated_token_ids"])
        assert torch.equal(ids[:len(prompt_ids)], prompt_ids)
        assert_greedy(model, prompt_ids, ids[len(prompt_ids):])
    if dtype == torch.float32:
        assert runs[True]["generated_token_ids"] == runs[False]["generated_token_ids"]
    assert len(set(runs[True]["generated_token_ids"][len(prompt_ids):])) > 2


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_forward_extends_the_given_cache(kind, argument):
    """A cache passed under either name is filled in place, returned, and its length gives the positions."""
    model = tiny_model()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    if kind == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        steps = []
        for chunk in (ids[:, :6], ids[:, 6:8], ids[:, 8:]):
            out = model(chunk, use_cache=True, **{argument: cache})
            assert out[CACHE_OUTPUT] is cache
            steps.append(out.logits)
        assert int(cache.get_seq_length()) == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-5)


def test_forward_refuses_what_it_does_not_implement():
    model = tiny_model()
    ids = torch.randint(3, 64, (1, 4), generator=torch.Generator().manual_seed(6))
    with pytest.raises(TypeError, match="unexpected keyword argument.*cach_position"):
        model(ids, cach_position=torch.arange(4))
    with pytest.raises(TypeError, match="unexpected keyword argument.*head_mask"):
        model.model(ids, head_mask=None)
    with pytest.raises(ValueError, match="either `cache` or `past_key_values`"):
        model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))
    assert {"cache", "past_key_values"} <= set(model._skip_keys_device_placement)



def test_logits_to_keep_takes_a_count_or_the_positions():
    """As transformers' models do, ``logits_to_keep`` is the number of last positions or a 1D tensor of the
    positions: a tensor failed with 'Boolean value of Tensor with more than one value is ambiguous'."""
    model = tiny_model()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(model(ids, logits_to_keep=2).logits, full[:, -2:], rtol=0, atol=0)
        positions = torch.tensor([0, 3])
        torch.testing.assert_close(model(ids, logits_to_keep=positions).logits, full[:, positions], rtol=0, atol=0)


def test_config_return_dict_false_gives_tuples():
    """``return_dict=False`` in the config (or per call) gives tuples from both models, the logits first."""
    model = tiny_model()
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(ids).logits
        model.config.return_dict = False
        out = model(ids, use_cache=False)
        assert isinstance(out, tuple) and isinstance(model.model(ids, use_cache=False), tuple)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)


def test_config_output_hidden_states_is_the_default():
    """As in transformers' own models, ``config.output_hidden_states`` applies when a call does not say."""
    model = tiny_model()
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert model(ids).hidden_states is None
        model.config.output_hidden_states = True
        hidden = model(ids).hidden_states
        assert len(hidden) == model.config.num_hidden_layers + 1
        assert model(ids, output_hidden_states=False).hidden_states is None


@pytest.mark.parametrize("padded", [False, True])
def test_output_attentions_gives_the_attention_weights(padded):
    """Each layer's softmax(q k^T / sqrt(d) + mask), per query head (GQA), from the forward and from generate,
    which also keeps its tokens and logits."""
    model = tiny_model(num_key_value_heads=2)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
    attentions, hooks = [], []
    for layer in model.model.layers:
        def record(module, args, attn=layer.self_attn):
            x = args[0]
            q = attn.q_proj(x).view(2, 6, 4, 8).transpose(1, 2)
            k = attn.k_proj(x).view(2, 6, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
            cos, sin = rotary_cos_sin(model.config, torch.arange(6).expand(2, -1), x.dtype)
            scores = apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2) / 8**0.5
            allowed = torch.ones(6, 6, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
            attentions.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1))
        hooks.append(layer.self_attn.register_forward_pre_hook(record))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
        for hook in hooks:
            hook.remove()
        expected = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert len(out.attentions) == model.config.num_hidden_layers
    rows = mask.bool()[:, None, :, None]  # the rows of padding queries are not compared
    for actual, reference in zip(out.attentions, attentions, strict=True):
        assert actual.shape == (2, 4, 6, 6)
        torch.testing.assert_close(actual.masked_fill(~rows, 0), reference.masked_fill(~rows, 0),
                                   rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        run = model.generate(ids, attention_mask=mask, **GREEDY, pad_token_id=0, return_dict_in_generate=True,
                             output_attentions=True)
        plain = model.generate(ids, attention_mask=mask, **GREEDY, pad_token_id=0)
    assert torch.equal(run.sequences, plain)
    assert len(run.attentions) == GREEDY["max_new_tokens"]
    assert run.attentions[-1][0].shape == (2, 4, 1, 6 + GREEDY["max_new_tokens"] - 1)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_stops_at_stop_strings(num_beams, tmp_path):
    """``stop_strings`` needs ``tokenizer=``, which generate also hands on to the forward."""
    from transformers import AutoTokenizer

    from dsmoe_megatron.tokenizer import ByteTokenizer, write_hf_tokenizer

    byte = ByteTokenizer()
    model = tiny_model(vocab_size=byte.vocab_size, pad_token_id=byte.pad, bos_token_id=byte.bos,
                       eos_token_id=byte.eod)
    tokenizer = AutoTokenizer.from_pretrained(write_hf_tokenizer(tmp_path / "tokenizer"))
    prompt = torch.tensor([byte.tokenize("Four score and")])
    settings = dict(do_sample=False, num_beams=num_beams, max_new_tokens=12, pad_token_id=byte.pad)
    with torch.no_grad():
        full = model.generate(prompt, **settings)[0, prompt.shape[1]:]
        # A printable byte the continuation reaches after its first token (bytes >= 128 decode to U+FFFD).
        at = next(i for i, t in enumerate(full.tolist()) if i > 0 and 32 <= t < 127)
        stop = chr(full[at])
        stopped = model.generate(prompt, **settings, stop_strings=[stop], tokenizer=tokenizer)[0, prompt.shape[1]:]
    assert tokenizer.decode(stopped).endswith(stop) and torch.equal(stopped, full[:len(stopped)])
    assert len(stopped) <= at + 1 < len(full)


def test_offloaded_weights_give_the_same_logits():
    """With accelerate's offloading (``device_map="auto"`` with too little memory) weights stay on the meta device
    until their module is called; the router must be called too, not only read."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(ids).logits
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.model.layers[1].mlp.gate.weight.device.type == "meta"
        actual = model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)

# ---------------------------------------------------------------------------------------------
# Fine-tuning an exported model with transformers: the balance loss in training mode, gradient
# checkpointing, and the Trainer with gradient accumulation against a plain PyTorch loop.

# transformers 5.24 renamed gradient checkpointing (`gradient_checkpointing_enable`, the Trainer's
# `gradient_checkpointing`) to activation checkpointing.
CHECKPOINTING = ("activation_checkpointing" if hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable")
                 else "gradient_checkpointing")

def released_balance_loss(x, gate_weight, top_k, alpha, seq_aux):
    """The released DeepSeek training code's balance loss, written out per sequence and expert:
    alpha * sum_i f_i P_i, f_i = N'/(K'T) * #tokens choosing i, P_i the mean probability of expert i."""
    probs = torch.softmax(x.float() @ gate_weight.float().T, dim=-1)  # [batch, seq, experts]
    num_experts = probs.shape[-1]
    chosen = probs.topk(top_k, dim=-1).indices
    if seq_aux:
        groups = list(zip(probs, chosen))
    else:
        groups = [(probs.reshape(-1, num_experts), chosen.reshape(-1, top_k))]
    total = 0.0
    for p, c in groups:
        tokens = p.shape[0]
        total = total + sum(num_experts / (top_k * tokens) * (c == i).sum() * p[:, i].mean()
                            for i in range(num_experts))
    return alpha * total / len(groups)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_training_loss_adds_the_released_balance_loss(seq_aux):
    model = tiny_model(num_hidden_layers=3, aux_loss_alpha=0.1, seq_aux=seq_aux, initializer_range=0.02)
    ids = torch.randint(3, 64, (3, 8), generator=torch.Generator().manual_seed(7))
    moe_inputs = []
    for layer in model.model.layers[1:]:
        layer.mlp.register_forward_pre_hook(lambda module, args: moe_inputs.append(args[0]))
    with torch.no_grad():
        eval_out = model(ids, labels=ids)
    assert eval_out.aux_loss is None
    moe_inputs.clear()

    out = model.train()(ids, labels=ids)
    gates = [layer.mlp.gate.weight for layer in model.model.layers[1:]]
    expected = sum(released_balance_loss(x, g, 2, 0.1, seq_aux) for x, g in zip(moe_inputs, gates))
    assert expected > 0.1 * 2  # each layer's loss is alpha * (about 1 or more)
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, eval_out.loss + expected, rtol=1e-6, atol=0)
    # The gradient reaches the routers through the probabilities P_i, as in the released code.
    actual_grads = torch.autograd.grad(out.aux_loss, gates, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, gates)
    for actual, reference in zip(actual_grads, expected_grads):
        assert reference.abs().max() > 0
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-8)


def test_gradient_checkpointing_recomputes_layers_to_the_same_gradients():
    model = tiny_model(num_hidden_layers=3).train()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(8))
    calls = []
    for layer in model.model.layers:
        # A pre-hook: torch's checkpoint may stop a recompute once it has what backward needs.
        layer.self_attn.register_forward_pre_hook(lambda *args: calls.append(1))

    def gradients():
        model.zero_grad()
        calls.clear()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, len(calls)

    plain, plain_calls = gradients()
    getattr(model, f"{CHECKPOINTING}_enable")()
    recomputed, recomputed_calls = gradients()
    assert (plain_calls, recomputed_calls) == (3, 6)  # every layer ran again in backward
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_trainer_fine_tunes_with_accumulation_and_checkpointing(tmp_path):
    """transformers' Trainer (which passes ``num_items_in_batch``) with gradient accumulation and gradient
    checkpointing takes the steps a plain PyTorch loop takes on the same batches."""
    import copy

    from transformers import Trainer, TrainingArguments

    model = tiny_model(aux_loss_alpha=0.1).train()
    reference = copy.deepcopy(model)
    ids = torch.randint(3, 64, (10,), generator=torch.Generator().manual_seed(9))
    # Identical examples: the Trainer's shuffling cannot change what a step sees.
    dataset = [{"input_ids": ids, "labels": ids}] * 8
    batch, accumulation, steps, lr = 2, 2, 2, 1e-3
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=lr,
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                             use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, **{CHECKPOINTING: True})
    Trainer(model=model, args=args, train_dataset=dataset).train()

    optimizer = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=0.0)
    micro_batch = ids.expand(batch, -1)
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(accumulation):
            (reference(micro_batch, labels=micro_batch).loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
    trained = dict(model.named_parameters())
    moved = 0.0
    for name, param in reference.named_parameters():
        torch.testing.assert_close(trained[name], param, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, (param - tiny_model(aux_loss_alpha=0.1).get_parameter(name)).abs().max().item())
    assert moved > 1e-3  # the steps changed the weights
