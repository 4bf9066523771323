"""Chunked prefill is the same computation as feeding the prompt one token at a time.

A prompt of n tokens runs through `forward` in chunks of C; the final chunk is
padded, and its padding sits at position == cache size. Logits of every real
token and every layer's cache slots [0, n) must match the token-by-token run,
and so must a few decode steps after the prefill: whatever the padding left in
the cache past n is never read.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from yalm_jax import model
from yalm_jax.config import ModelConfig
from yalm_jax.weights import build_weights, expected_shapes

N = 19  # prompt length: no chunk size below divides it, so the last chunk is padded
DECODE = 3  # tokens decoded one at a time after the prefill
CACHE = 32
TOL = 1e-5

CONFIGS = {
    "llama": ModelConfig(
        arch="llama", vocab_size=96, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
    ),
    # A window smaller than both the prompt and the chunks, and q/k/v biases.
    "window_bias": ModelConfig(
        arch="mistral", vocab_size=96, dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=1,
        head_dim=16, norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64, sliding_window=5,
        qkv_bias=True,
    ),
}


class DictSource:
    def __init__(self, tensors):
        self.tensors = tensors

    def has(self, name):
        return name in self.tensors

    def get(self, name):
        return self.tensors[name]


def random_weights(cfg: ModelConfig, seed: int | None = None, **build):
    """Fresh random weights; a seed only where a test compares argmaxes (a near-tie could flip one). `build`:
    build_weights' options (quant, int8_activations)."""
    rng = np.random.default_rng(seed)
    tensors = {
        k: (1.0 + 0.1 * rng.standard_normal(s) if "norm" in k else 0.2 * rng.standard_normal(s)).astype(np.float32)
        for k, s in expected_shapes(cfg).items()
    }
    return build_weights(cfg, DictSource(tensors), **build)


def token_by_token(weights, cfg, tokens, cache_size=CACHE, attn_len=None):
    cache = model.init_cache(cfg, cache_size)
    rows = []
    for p, t in enumerate(tokens):
        logits, cache = model.forward(
            weights, cache, jnp.array([t], jnp.int32), jnp.array([p], jnp.int32), cfg=cfg, attn_len=attn_len
        )
        rows.append(np.asarray(logits[0]))
    return np.stack(rows), cache


def chunked(weights, cfg, tokens, chunk, cache_size=CACHE, attn_len=None):
    """Prefill the first N tokens in padded chunks, then decode the rest one at a time."""
    cache = model.init_cache(cfg, cache_size)
    rows = []
    for start in range(0, N, chunk):
        real = min(chunk, N - start)
        toks = np.zeros(chunk, np.int32)
        toks[:real] = tokens[start : start + real]
        pos = np.full(chunk, cache_size, np.int32)  # padding: at the cache size
        pos[:real] = np.arange(start, start + real)
        logits, cache = model.forward(weights, cache, jnp.asarray(toks), jnp.asarray(pos), cfg=cfg, attn_len=attn_len)
        rows.append(np.asarray(logits[:real]))
    for p in range(N, len(tokens)):
        logits, cache = model.forward(
            weights, cache, jnp.asarray(tokens[p : p + 1]), jnp.array([p], jnp.int32), cfg=cfg, attn_len=attn_len
        )
        rows.append(np.asarray(logits))
    return np.concatenate(rows), cache


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-30))


def assert_same_run(got, want, n):
    (logits, cache), (ref_logits, ref_cache) = got, want
    assert np.all(np.isfinite(logits))
    assert rel_err(logits, ref_logits) <= TOL
    for layer, (k, v, rk, rv) in enumerate(zip(cache.k, cache.v, ref_cache.k, ref_cache.v)):
        assert rel_err(k[:, :n], rk[:, :n]) <= TOL, f"layer {layer} keys"
        assert rel_err(v[:, :n], rv[:, :n]) <= TOL, f"layer {layer} values"


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng().integers(0, 96, N + DECODE).astype(np.int32)


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request, tokens):
    cfg = CONFIGS[request.param]
    weights = random_weights(cfg)
    return cfg, weights, token_by_token(weights, cfg, tokens)


@pytest.mark.parametrize("chunk", [4, 7, 24])
def test_chunked_prefill_equals_token_by_token(setup, tokens, chunk):
    cfg, weights, ref = setup
    assert_same_run(chunked(weights, cfg, tokens, chunk), ref, N + DECODE)


def test_attn_len_smaller_than_cache(setup, tokens):
    """Reading only the first 24 of 64 slots changes nothing while every position is below 24."""
    cfg, weights, ref = setup
    big = 2 * CACHE
    got = chunked(weights, cfg, tokens, 8, cache_size=big, attn_len=24)
    assert_same_run(got, ref, N + DECODE)
    assert_same_run(token_by_token(weights, cfg, tokens, cache_size=big, attn_len=24), ref, N + DECODE)


def test_sliding_window_hides_old_keys(tokens):
    """With window w, position p's output ignores what sits in slots <= p - w."""
    cfg = CONFIGS["window_bias"]
    weights = random_weights(cfg)
    logits, cache = chunked(weights, cfg, tokens[:N], 7)
    p = N - 1

    def rerun_last(cfg):
        # The first 10 slots hold garbage; rerun the last prompt token over them.
        poisoned = model.KVCache(k=[k.at[:, :10].set(7.0) for k in cache.k], v=[v.at[:, :10].set(-7.0) for v in cache.v])
        out, _ = model.forward(weights, poisoned, jnp.asarray(tokens[p : p + 1]), jnp.array([p], jnp.int32), cfg=cfg)
        return out[0]

    assert rel_err(rerun_last(cfg), logits[p]) <= TOL
    assert rel_err(rerun_last(dataclasses.replace(cfg, sliding_window=None)), logits[p]) > 1e-3
