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

from dsmoe_megatron.hf import AUTO_MAP, write_hf_remote_code  # noqa: E402
from dsmoe_megatron.hf.configuration_deepseek import DeepseekConfig  # noqa: E402
from dsmoe_megatron.hf.modeling_deepseek import DeepseekForCausalLM, DeepseekMoE  # noqa: E402

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
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
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
    moe = DeepseekMoE(config)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        actual = moe(x)

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


def test_generate_greedy_with_and_without_cache():
    model = tiny_model()
    prompts = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # second prompt is left-padded
    prompts[1, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompts, use_cache=True, **kwargs)
        recomputed = model.generate(prompts, use_cache=False, **kwargs)
        alone = model.generate(prompts[1:, 2:], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert cached.shape == (2, 10)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[1, 2:], alone[0])
