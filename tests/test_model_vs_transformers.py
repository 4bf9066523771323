"""The model's logits match transformers' on tiny random checkpoints, one per supported variant.

Each variant is a real `save_pretrained` directory (safetensors), loaded through
the HF loader and compared on every logit of a 24-token random prompt:
relative error = max |ours - ref| / max |ref| <= 1e-4 in float32.
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
TOL_F32 = 1e-4
# bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); two layers of
# rounded weights and activations stay well inside 5e-2 of the f32 logits.
TOL_BF16 = 5e-2

_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)

VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # Frequencies with wavelengths above 8 are scaled, those between 2 and 8 are
    # smoothed; the prompt's positions reach 23, well past 8.
    "llama3_rope_scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
        ),
    ),
    "explicit_head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=32)),
    "mqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1)),
    "tied_embeddings": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2_qkv_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
}


def _randomize(m) -> None:
    """transformers zero-inits biases and one-inits norms; make every tensor count."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)


def make_hf_model(tmp_dir, variant: str, torch_dtype=None):
    config_cls, model_cls, extra = VARIANTS[variant]
    config = getattr(transformers, config_cls)(**{**_BASE, **extra})
    m = getattr(transformers, model_cls)(config).eval()
    _randomize(m)
    if torch_dtype is not None:
        m = m.to(torch_dtype)
    m.save_pretrained(tmp_dir)
    return m


def reference_logits(m, tokens: np.ndarray) -> np.ndarray:
    m = m.float()
    with torch.no_grad():
        return m(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()


def our_logits(model_dir, tokens: np.ndarray, dtype: str = "float32", **cfg_changes) -> np.ndarray:
    cfg = hf.load_hf_config(str(model_dir), dtype)
    cfg = dataclasses.replace(cfg, **cfg_changes)
    weights = build_weights(cfg, hf.SafetensorsSource(str(model_dir)))
    cache = model.init_cache(cfg, 32)
    positions = jnp.arange(len(tokens), dtype=jnp.int32)
    logits, _ = model.forward(weights, cache, jnp.asarray(tokens, jnp.int32), positions, cfg=cfg)
    return np.asarray(logits)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, _BASE["vocab_size"], PROMPT_LEN)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokens):
    """variant -> (model directory, transformers' f32 logits); built once per module."""
    out = {}
    for variant in VARIANTS:
        d = tmp_path_factory.mktemp(variant)
        out[variant] = (d, reference_logits(make_hf_model(d, variant), tokens))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, tokens, variant):
    model_dir, ref = checkpoints[variant]
    assert rel_err(our_logits(model_dir, tokens), ref) <= TOL_F32


def test_tied_checkpoint_has_no_lm_head(checkpoints):
    assert not hf.SafetensorsSource(str(checkpoints["tied_embeddings"][0])).has("lm_head.weight")


def test_llama3_rope_scaling_matters(checkpoints, tokens):
    model_dir, ref = checkpoints["llama3_rope_scaling"]
    assert rel_err(our_logits(model_dir, tokens, rope_scaling=None), ref) > 1e-3


def test_sliding_window_matters(checkpoints, tokens):
    model_dir, ref = checkpoints["mistral_sliding_window"]
    assert hf.load_hf_config(str(model_dir), "float32").sliding_window == 5
    assert rel_err(our_logits(model_dir, tokens, sliding_window=None), ref) > 1e-3
    # One more visible key per query (window 6) is already a different model.
    assert rel_err(our_logits(model_dir, tokens, sliding_window=6), ref) > 1e-3


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads_exactly_into_f32(tmp_path, tokens, torch_dtype):
    """A bf16/f16 file read into f32 is the same model as transformers' upcast one."""
    make_hf_model(tmp_path, "llama", torch_dtype=getattr(torch, torch_dtype))
    # Reloaded rather than upcast in place, which would keep a rounded rope inv_freq.
    m = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert rel_err(our_logits(tmp_path, tokens), reference_logits(m, tokens)) <= TOL_F32


def test_bf16_load(checkpoints):
    model_dir, _ = checkpoints["qwen2_qkv_bias"]
    cfg = hf.load_hf_config(str(model_dir), "bfloat16")
    w16 = build_weights(cfg, hf.SafetensorsSource(str(model_dir)))
    w32 = build_weights(cfg.with_dtype("float32"), hf.SafetensorsSource(str(model_dir)))
    assert w16.layers[0].wqkv.dtype == jnp.bfloat16 and w16.layers[0].bqkv.dtype == jnp.bfloat16
    assert rel_err(np.asarray(w16.layers[1].w13, np.float32), np.asarray(w32.layers[1].w13)) <= 2**-8


def test_bf16_compute_is_close_to_f32(checkpoints, tokens):
    model_dir, ref = checkpoints["qwen2_qkv_bias"]
    try:
        ours = our_logits(model_dir, tokens, dtype="bfloat16")
    except Exception as e:  # noqa: BLE001
        if "DotThunk" in str(e):  # XLA:CPU has no batched BF16 x BF16 -> F32 dot (ops.attention's probs @ v)
            pytest.xfail(f"XLA:CPU: {str(e).splitlines()[0]}")
        raise
    assert rel_err(ours, ref) <= TOL_BF16
