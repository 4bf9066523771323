"""The model matches transformers on tiny random checkpoints, one per supported variant.

Each variant (tiny_models.VARIANTS) is a real `save_pretrained` directory
(safetensors), loaded through the HF loader. Logits of a fresh 24-token random
prompt: relative error = max |ours - ref| / max |ref| <= 1e-4 in float32.
Greedy: a prefill of a fixed 8-token prompt, then 32 tokens one at a time through
`model.forward` (the decode path), equal to transformers' generate(do_sample=False).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import (  # noqa: E402
    GREEDY_NEW,
    GREEDY_PROMPT,
    TOL_F32,
    VARIANTS,
    load,
    make_hf_model,
    our_greedy,
    our_logits,
    reference_logits,
    rel_err,
)

from yalm_jax.loading import hf  # noqa: E402
from yalm_jax.weights import build_weights  # noqa: E402

# bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); two layers of
# rounded weights and activations stay well inside 5e-2 of the f32 logits.
TOL_BF16 = 5e-2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant_checkpoints, variant_tokens, variant):
    model_dir, ref, _ = variant_checkpoints[variant]
    assert rel_err(our_logits(model_dir, variant_tokens), ref) <= TOL_F32


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_transformers(variant_checkpoints, variant):
    model_dir, _, ref = variant_checkpoints[variant]
    cfg, weights = load(model_dir)
    assert our_greedy(cfg, weights, GREEDY_PROMPT, GREEDY_NEW) == ref


def test_tied_checkpoint_has_no_lm_head(variant_checkpoints):
    assert not hf.SafetensorsSource(str(variant_checkpoints["tied_embeddings"][0])).has("lm_head.weight")


def test_llama3_rope_scaling_matters(variant_checkpoints, variant_tokens):
    model_dir, ref, _ = variant_checkpoints["llama3_rope_scaling"]
    assert rel_err(our_logits(model_dir, variant_tokens, rope_scaling=None), ref) > 1e-3


def test_sliding_window_matters(variant_checkpoints, variant_tokens):
    model_dir, ref, _ = variant_checkpoints["mistral_sliding_window"]
    assert hf.load_hf_config(str(model_dir), "float32").sliding_window == 5
    assert rel_err(our_logits(model_dir, variant_tokens, sliding_window=None), ref) > 1e-3
    # One more visible key per query (window 6) is already a different model.
    assert rel_err(our_logits(model_dir, variant_tokens, sliding_window=6), ref) > 1e-3


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads_exactly_into_f32(tmp_path, variant_tokens, torch_dtype):
    """A bf16/f16 file read into f32 is the same model as transformers' upcast one."""
    make_hf_model(tmp_path, "llama", torch_dtype=getattr(torch, torch_dtype))
    # Reloaded rather than upcast in place, which would keep a rounded rope inv_freq.
    m = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert rel_err(our_logits(tmp_path, variant_tokens), reference_logits(m, variant_tokens)) <= TOL_F32


def test_bf16_load(variant_checkpoints):
    model_dir = variant_checkpoints["qwen2_qkv_bias"][0]
    cfg = hf.load_hf_config(str(model_dir), "bfloat16")
    w16 = build_weights(cfg, hf.SafetensorsSource(str(model_dir)))
    w32 = build_weights(cfg.with_dtype("float32"), hf.SafetensorsSource(str(model_dir)))
    assert w16.layers[0].wqkv.dtype == jnp.bfloat16 and w16.layers[0].bqkv.dtype == jnp.bfloat16
    assert rel_err(np.asarray(w16.layers[1].w13, np.float32), np.asarray(w32.layers[1].w13)) <= 2**-8


def test_bf16_compute_is_close_to_f32(variant_checkpoints, variant_tokens):
    model_dir, ref, _ = variant_checkpoints["qwen2_qkv_bias"]
    assert rel_err(our_logits(model_dir, variant_tokens, dtype="bfloat16"), ref) <= TOL_BF16
