"""Ring-buffer KV cache with attention sinks (StreamingLLM): model.KVCache(ring_sinks=...), ops.ring_attention.

Within the window a ring cache is the ordinary cache; without sinks it is a
sliding window; with sinks, a query scores the sinks at its position within the
cache (checked exactly on one layer, where keys depend on the token alone);
positions far past the window stay finite in bf16/f16; and the Generator
decodes past its window through the ring.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_prefill import CONFIGS, random_weights, rel_err

from yalm_jax import generate as gen
from yalm_jax import model

TOL = 1e-5
CFG = CONFIGS["llama"]  # 2 layers, 4 heads, 2 kv heads, vocab 96


def run_chunks(weights, cfg, cache, tokens, start=0, chunk=8):
    """Logits of tokens[start:] (positions start..), fed in the chunks generate.prefill would use."""
    rows = []
    sinks = cache.ring_sinks
    for s, n, length in gen._plan_prefill(start, len(tokens), chunk, cache.max_context, sinks):
        ids, pos, _ = gen._chunk_args(tokens, s, n, length)
        logits, cache = model.forward(weights, cache, ids, pos, cfg=cfg)
        rows.append(np.asarray(logits[:n]))
    return np.concatenate(rows), cache


# Fixed draws: test_generator_decodes_past_its_window_through_the_ring compares greedy tokens from two
# programs (a ring decode chunk and single steps), which a near-tie between two logits could flip.
@pytest.fixture(scope="module")
def weights():
    return random_weights(CFG, seed=1)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(3).integers(0, CFG.vocab_size, 80).astype(np.int32)


@pytest.mark.parametrize("sinks", [0, 2])
def test_ring_cache_equals_the_full_cache_within_the_window(weights, tokens, sinks):
    want, _ = run_chunks(weights, CFG, model.init_cache(CFG, 64), tokens[:30], chunk=7)
    got, _ = run_chunks(weights, CFG, model.init_cache(CFG, 32, ring_sinks=sinks), tokens[:30], chunk=7)
    assert rel_err(got, want) <= TOL


def test_ring_without_sinks_is_a_sliding_window(weights, tokens):
    """Past the window, a 16-slot ring with no sinks attends exactly like a 16-token sliding window."""
    want, _ = run_chunks(weights, dataclasses.replace(CFG, sliding_window=16), model.init_cache(CFG, 128), tokens)
    got, _ = run_chunks(weights, CFG, model.init_cache(CFG, 16, ring_sinks=0), tokens, chunk=6)
    assert rel_err(got, want) <= TOL
    # Token by token gives the same (decode writes one slot at a time around the ring).
    one, _ = run_chunks(weights, CFG, model.init_cache(CFG, 16, ring_sinks=0), tokens, chunk=1)
    assert rel_err(one, want) <= TOL


def test_sinks_are_scored_at_cache_relative_positions(tokens):
    """One layer: keys depend on the token alone, so the StreamingLLM cache at position p is the
    compacted sequence [t0, t1, t_{p-13} .. t_p] at cache positions 0 .. 15, run from scratch."""
    cfg = dataclasses.replace(CFG, n_layers=1)
    weights = random_weights(cfg)
    slots, sinks = 16, 2
    got, _ = run_chunks(weights, cfg, model.init_cache(cfg, slots, ring_sinks=sinks), tokens, chunk=5)
    for p in (slots, 37, len(tokens) - 1):
        seq = np.concatenate([tokens[:sinks], tokens[p - (slots - sinks) + 1 : p + 1]])
        want, _ = model.forward(weights, model.init_cache(cfg, slots), jnp.asarray(seq), jnp.arange(slots), cfg=cfg)
        assert rel_err(got[p], want[-1]) <= TOL, p
    # Without the cache-relative sink positions (sinks scored at their true distance) it differs.
    far = np.concatenate([tokens[:sinks], tokens[p - (slots - sinks) + 1 : p + 1]])
    positions = np.concatenate([np.arange(sinks), np.arange(p - (slots - sinks) + 1, p + 1)])
    true_dist, _ = model.forward(weights, model.init_cache(cfg, 128), jnp.asarray(far), jnp.asarray(positions), cfg=cfg)
    assert rel_err(got[p], true_dist[-1]) > 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_no_nan_or_inf_at_32k_positions(weights, tokens, dtype):
    """A 64-slot ring with 2 sinks fed at positions up to 32k: finite, and close to the same run in f32."""
    cfg16 = CFG.with_dtype(dtype)
    w16 = jax.tree.map(lambda x: x.astype(dtype), weights)  # the f32 run's weights, rounded
    seq = np.concatenate([tokens, tokens[::-1]] * 205)[: 32768 + 40]  # positions 0 .. 32807
    starts = [(0, 64), (16384, 16384 + 64), (32768 - 24, len(seq))]
    results = {}
    for name, (c, w) in {"lo": (cfg16, w16), "f32": (CFG, weights)}.items():
        cache = model.init_cache(c, 64, ring_sinks=2)
        out = []
        for a, b in starts:  # jumping ahead leaves stale slots, as a long run would; the ring masks by position
            logits, cache = run_chunks(w, c, cache, seq[:b], start=a, chunk=16)
            out.append(logits)
        results[name] = (np.concatenate(out), cache)
    logits, cache = results["lo"]
    assert np.all(np.isfinite(logits))
    assert all(np.all(np.isfinite(np.asarray(k, np.float32))) for k in cache.k + cache.v)
    assert np.max(np.abs(logits)) > 1.0  # not a degenerate all-zero output
    ref = results["f32"][0]
    assert rel_err(logits, ref) < 0.1
    assert np.mean(np.argmax(logits, -1) == np.argmax(ref, -1)) > 0.8


def test_generator_decodes_past_its_window_through_the_ring(weights, tokens):
    """Greedy generation with max_context 96 on a 24-slot ring equals feeding the argmax token by token."""
    prompt = tokens[:30].tolist()  # longer than the window: the prefill itself wraps the ring

    class Tok:
        eos_ids = frozenset()

        def stream_decoder(self):
            class D:
                def push(self, ids):
                    return ""

                def flush(self):
                    return ""

            return D()

    g = gen.Generator(weights, CFG, Tok(), max_context=96, window=24, sinks=2, prefill_chunk=8, decode_chunk=8)
    out = g.generate(prompt, max_new_tokens=50)
    assert out.finish_reason == "length" and len(out.token_ids) == 50

    cache = model.init_cache(CFG, 24, ring_sinks=2)
    logits, cache = run_chunks(weights, CFG, cache, np.asarray(prompt, np.int32), chunk=1)
    want = [int(np.argmax(logits[-1]))]
    for p in range(len(prompt), len(prompt) + 49):
        step, cache = model.forward(weights, cache, jnp.asarray([want[-1]]), jnp.asarray([p]), cfg=CFG)
        want.append(int(np.argmax(step[0])))
    assert out.token_ids == want

    # The cache holds prompt + output (79 positions, wrapped): continuing it reuses everything.
    more = g.generate(prompt + out.token_ids + [5], max_new_tokens=4)
    assert more.prefilled == 2  # the last output token (never fed) and the new one
    # Any other prompt restarts (only the ring's newest slots are left).
    again = g.generate(prompt + [7], max_new_tokens=4)
    assert again.prefilled == len(prompt) + 1
