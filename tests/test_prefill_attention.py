"""The prefill attention kernel against its jnp reference.

Interpret mode on the CPU, at shapes whose grids stay at <= 12 steps; fresh
random inputs every run, the output starts as NaN, and the cache slots no query
may see (past the chunk, and before the window) hold NaN, so a kernel that
reads them where they count, or forgets a row, fails the check.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_kernels import INTERPRET, ON_GPU, TF32X3, TOL, _key, _rel_err

from pallas_kernels import prefill_attention as pa
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_reference

SMALL = (16, 16, 4, 2)  # block_rows, block_k, num_warps, num_stages: 16 rows = 4 positions of a group of 4
FP8 = jnp.float8_e4m3fn


def _check(n_heads, n_kv, hd, t, s, q_start, window, dtype, config, *, cache_dtype=None, scale=None):
    k1, k2, k3 = jax.random.split(_key(), 3)
    q = jax.random.normal(k1, (s, n_heads, hd), dtype)
    kc = jax.random.normal(k2, (n_kv, t, hd), jnp.float32).astype(cache_dtype or dtype)
    vc = jax.random.normal(k3, (n_kv, t, hd), jnp.float32).astype(cache_dtype or dtype)
    # Unwritten slots may hold anything; with a window, the slots before it must not count either.
    slot = jnp.arange(t)[None, :, None]
    unseen = slot >= q_start + s
    if window is not None:
        unseen |= slot <= q_start - window
    nan = jnp.full((), jnp.nan, kc.dtype)
    kc, vc = jnp.where(unseen, nan, kc), jnp.where(unseen, nan, vc)

    def run(q, kc, vc, q_start):
        poison = jnp.full(q.shape, jnp.nan, q.dtype)
        return prefill_attention(
            q, kc, vc, q_start, window=window, scale=scale, config=config, out=poison, interpret=INTERPRET
        )

    out = jax.jit(run)(q, kc, vc, jnp.int32(q_start))
    ref = prefill_attention_reference(q.astype(jnp.float32), kc, vc, q_start, window=window, scale=scale)
    assert out.shape == (s, n_heads, hd) and out.dtype == dtype
    assert _rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "n_heads,s,q_start,window",
    [
        (2, 23, 0, None),  # one query head per kv head; 23 positions in blocks of 16
        (6, 13, 0, None),  # SmolLM2's group of 3, padded to 4
        (8, 10, 37, None),  # Mistral's group of 4, a chunk after 37 cached positions
        (6, 11, 29, 12),  # a window smaller than the context, and than a key block past the q block
        (8, 9, 20, 27),  # a window that spans the chunk's start
    ],
    ids=["mha", "gqa3", "gqa4_cached", "gqa3_window", "gqa4_window"],
)
def test_prefill_attention_matches_reference_small(dtype, n_heads, s, q_start, window):
    _check(n_heads, 2, 32, 64, s, q_start, window, dtype, SMALL)


@pytest.mark.parametrize("dtype,cache_dtype", [(jnp.float32, FP8), (jnp.bfloat16, FP8), (jnp.float32, jnp.bfloat16)])
def test_prefill_attention_narrow_cache(dtype, cache_dtype):
    # e4m3 values are exact in bf16 and f32: the upcast adds no error of its own. An f32 query over a narrower
    # cache multiplies in three bf16 terms (attention_operands), within f32's tolerance of the f32 reference.
    _check(8, 2, 32, 64, 10, 21, None, dtype, SMALL, cache_dtype=cache_dtype)


def test_prefill_attention_f16_and_scale():
    _check(8, 2, 16, 48, 7, 30, 16, jnp.float16, SMALL, scale=0.3)


def test_prefill_attention_default_config():
    # One kv head's 40 positions: 16 rows a program (4 positions x 4 heads; fewer programs than a wave, so the
    # rows halve to MIN_ROWS), keys in blocks of 128: grid (1 kv head, 10 q blocks).
    _check(4, 1, 16, 128, 40, 50, None, jnp.float32, None)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prefill_attention_head_dim_256(dtype):
    # Gemma 3's head (one kv head of four queries) on the default config: 16 rows (its few programs), block_k cut
    # to fit (f32 to 32, bf16 to 64; launch_config); compiled on a GPU, where the unfitted tile was refused.
    _check(4, 1, 256, 256, 40, 100, 24, dtype, None)


def test_prefill_attention_q_start_is_traced():
    # One compiled program serves every chunk start.
    k1, k2, k3 = jax.random.split(_key(), 3)
    q = jax.random.normal(k1, (5, 4, 16), jnp.float32)
    kc = jax.random.normal(k2, (2, 32, 16), jnp.float32)
    vc = jax.random.normal(k3, (2, 32, 16), jnp.float32)
    f = jax.jit(lambda q_start: prefill_attention(q, kc, vc, q_start, config=SMALL, interpret=INTERPRET))
    for q_start in (0, 19):
        ref = prefill_attention_reference(q, kc, vc, q_start)
        assert _rel_err(f(jnp.int32(q_start)), ref) < TOL[jnp.float32]
    assert f._cache_size() == 1


@pytest.mark.skipif(not ON_GPU, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "n_heads,n_kv,hd,s,q_start,window",
    [
        (32, 8, 128, 512, 0, None),
        (32, 8, 128, 500, 1000, None),
        (32, 8, 128, 512, 3000, 1024),
        (9, 3, 64, 300, 7, None),
    ],
    ids=["mistral", "mistral_cached", "mistral_window", "smollm2"],
)
def test_prefill_attention_matches_reference_real(dtype, n_heads, n_kv, hd, s, q_start, window):
    _check(n_heads, n_kv, hd, 4096, s, q_start, window, dtype, None)


@pytest.mark.skipif(not ON_GPU, reason="real shapes need a GPU")
@pytest.mark.parametrize("n_heads,n_kv,hd", [(32, 8, 128), (4, 1, 256)], ids=["mistral", "gemma3"])
def test_prefill_attention_f32_query_over_a_bf16_cache_real(n_heads, n_kv, hd):
    _check(n_heads, n_kv, hd, 4096, 512, 1000, None, jnp.float32, None, cache_dtype=jnp.bfloat16)


def test_reference_ignores_unseen_slots():
    # The reference itself must not let NaN in unseen slots through (0 * NaN).
    q = jnp.ones((3, 2, 16))
    kv = jnp.ones((1, 16, 16)).at[:, 3:].set(jnp.nan)
    assert np.isfinite(np.asarray(prefill_attention_reference(q, kv, kv, 0))).all()


def test_tiles_shrink_to_fit_shared_memory():
    # A 512-query chunk over 4,096 slots, groups of 4 query heads, with kv heads enough (32) that the chunk's
    # programs fill a wave at the default rows: what the default config becomes by shared memory alone
    # (pallas_kernels.decode_attention.tile_smem_bytes holds the count to the card's refusals). The f32 tiles
    # are the fastest of those that ran on an H100 for Mistral-7B, and for Gemma 3 of those with 32 rows.
    def fitted(hd, itemsize, precision=None):
        return pa.launch_config(None, 512, 4096, 32, 4, hd, itemsize, precision)

    assert fitted(128, 2) == (32, 128, 8, 2)  # bf16: the default
    assert fitted(64, 4, TF32X3) == (32, 128, 8, 2)  # f32 at SmolLM2's head of 64
    assert fitted(256, 2) == (32, 64, 8, 2)  # bf16 at Gemma 3's head of 256
    assert fitted(128, 4, TF32X3) == (32, 32, 8, 2)  # f32 at 128
    assert fitted(256, 4, TF32X3) == (8, 32, 4, 2)  # f32 at 256: 32 rows, one warpgroup


@pytest.mark.parametrize(
    "s,n_kv,hd,itemsize,expected",
    [
        (512, 8, 128, 2, (32, 128, 8, 2)),  # Mistral-7B: 128 programs fill the wave at 128 rows
        (64, 8, 128, 2, (4, 128, 4, 2)),  # its 64-token chunk: 16 rows, 128 programs
        (512, 3, 64, 2, (16, 128, 4, 2)),  # SmolLM2: 64 rows, 96 programs (192 would be two waves)
        (512, 3, 64, 4, (16, 128, 4, 2)),
        (512, 1, 256, 2, (4, 64, 4, 2)),  # Gemma 3's one kv head: 16 rows, 128 programs
        (512, 1, 256, 4, (4, 32, 4, 2)),
        (3, 1, 256, 2, (4, 64, 4, 2)),  # never below MIN_ROWS
    ],
)
def test_rows_halve_while_the_programs_fit_a_wave(s, n_kv, hd, itemsize, expected):
    # The tiles measured fastest of 16-128 rows a program on an H100 (KERNEL_NOTES.md run 31), chunks of 512 and
    # 64 tokens, groups of 4 query heads (SmolLM2's 3 padded to 4).
    precision = TF32X3 if itemsize == 4 else None
    bq, bk, num_warps, num_stages = pa.launch_config(None, s, 4096, n_kv, 4, hd, itemsize, precision)
    assert (bq, bk, num_warps, num_stages) == expected
    assert n_kv * -(-s // bq) <= pa.WAVE_PROGRAMS


