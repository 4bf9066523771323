"""Each Pallas kernel against its jnp reference.

On the CPU the kernels run in Pallas' interpreter at small shapes (each grid
step costs ~10 ms there, so grids stay at <= 16 steps); on a GPU they also run
compiled at the model's real shapes. Inputs are fresh random draws every run,
and outputs start as NaN (a buffer aliased to the output), so an element the
kernel forgets to write fails the check.

Tolerances, as ||out - ref|| / ||ref|| against an f32 reference:
f32 1e-5; f16 3e-3; bf16 1.5e-2 (one bf16 ulp is 2^-8 = 3.9e-3, and a fused
norm can flip the rounding of some inputs; the attention casts the softmax
weights to the cache dtype before the PV product, as the xla path does).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (
    DEFAULT_CONFIG,
    SMEM_LIMIT,
    attention_operands,
    config_for,
    decode_attention,
    decode_attention_reference,
    decode_tile_that_fits,
    merge_splits,
    split_terms,
    tile_smem_bytes,
)
from pallas_kernels.gemv import gemv, gemv_reference

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
TOL = {jnp.float32: 1e-5, jnp.float16: 3e-3, jnp.bfloat16: 1.5e-2}
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _key():
    # A fresh seed every run: the kernels must compute the function on any input.
    seed = time.time_ns() % (2**31)
    print(f"seed {seed}")
    return jax.random.key(seed)


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "unwritten (NaN) or non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _check_gemv(n, k, dtype, config, **kw):
    k1, k2, k3, k4 = jax.random.split(_key(), 4)
    w = jax.random.normal(k1, (n, k), dtype)
    x = jax.random.normal(k2, (k,), dtype)
    n_out = n // 2 if kw.get("gated") else n
    args = {}
    if kw.pop("bias", False):
        args["bias"] = jax.random.normal(k3, (n_out,), dtype)
    if kw.pop("residual", False):
        args["residual"] = jax.random.normal(k3, (n_out,), dtype)
    if kw.pop("norm", False):
        args["norm"] = (1.0 + 0.1 * jax.random.normal(k4, (k,), dtype), 1e-5)
    args.update(kw)
    poison = jnp.full((n_out,), jnp.nan, dtype)
    out = jax.jit(lambda w, x, p: gemv(w, x, config=config, out=p, interpret=INTERPRET, **args))(w, x, poison)
    assert out.shape == (n_out,) and out.dtype == dtype
    assert _rel_err(out, gemv_reference(w, x, **args)) < TOL[dtype]


SMALL_GEMV = (8, 64, 4, 2)  # block_n, block_k, num_warps, num_stages: grid of 8 steps below


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "form",
    [{}, {"bias": True}, {"residual": True}, {"norm": True}, {"gated": True, "norm": True},
     {"gated": True, "activation": "gelu_tanh"}],
    ids=["plain", "bias", "residual", "norm", "gated_norm", "gated_gelu"],
)
def test_gemv_matches_reference_small(dtype, form):
    n = 128 if form.get("gated") else 64
    _check_gemv(n, 256, dtype, SMALL_GEMV, **dict(form))


def test_gemv_writes_f32_for_a_16_bit_x():
    # Tensor parallelism sums the devices' partial products in f32 (ops.linear): the kernel writes them unrounded.
    k1, k2 = jax.random.split(_key())
    w, x = jax.random.normal(k1, (64, 256), jnp.bfloat16), jax.random.normal(k2, (256,), jnp.bfloat16)
    out = gemv(w, x, config=SMALL_GEMV, out_dtype=jnp.float32, interpret=INTERPRET)
    ref = gemv_reference(w, x, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32 and _rel_err(out, ref) < 1e-5
    assert _rel_err(out, ref.astype(jnp.bfloat16)) > 1e-4  # not bf16 values widened


@pytest.mark.parametrize("form", [{"residual": True}, {"gated": True, "norm": True}], ids=["residual", "gated_norm"])
def test_gemv_odd_shapes(form):
    # 96 rows and 576 columns (SmolLM2's dim): block_n falls to a power of two that divides the rows;
    # K is walked in chunks of 512, the second one masked past column 576.
    _check_gemv(96, 576, jnp.float32, (32, 512, 4, 2), **form)


def test_gemv_poison_is_seen():
    # The check itself must catch an unwritten output: a NaN buffer that no kernel touches fails.
    with pytest.raises(AssertionError, match="unwritten"):
        _rel_err(jnp.full((4,), jnp.nan), jnp.ones((4,)))


@pytest.mark.skipif(not ON_GPU, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,form",
    [
        ((6144, 4096), {"norm": True}),
        ((28672, 4096), {"gated": True, "norm": True}),
        ((4096, 14336), {"residual": True}),
        ((32000, 4096), {}),
        ((1152, 896), {"bias": True}),
    ],
)
def test_gemv_matches_reference_real(dtype, shape, form):
    _check_gemv(*shape, dtype, None, **dict(form))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n,k,config", [(128, 256, (64, 128, 2)), (192, 512, (64, 256, 3)), (256, 512, (128, 128, 4))])
def test_mosaic_gemv_matches_reference_small(dtype, n, k, config):
    """The Mosaic GPU GEMV (timed against the Triton one by gpu_check.py): several CTAs, several pipeline steps.
    On the CPU in Mosaic GPU's interpreter, whose buffers start as NaN, so an unwritten block fails."""
    from pallas_kernels.gemv_mosaic import gemv_mosaic

    k1, k2 = jax.random.split(_key())
    w, x = jax.random.normal(k1, (n, k), dtype), jax.random.normal(k2, (k,), dtype)
    out = gemv_mosaic(w, x, config=config, interpret=INTERPRET)
    assert out.shape == (n,) and out.dtype == dtype
    assert _rel_err(out, gemv_reference(w, x)) < TOL[dtype]


@pytest.mark.skipif(not ON_GPU, reason="real shapes need a GPU")
@pytest.mark.parametrize("n,k", [(6144, 4096), (14336, 4096), (4096, 14336), (32000, 4096)])
def test_mosaic_gemv_matches_reference_real(n, k):
    from pallas_kernels.gemv_mosaic import gemv_mosaic

    k1, k2 = jax.random.split(_key())
    w, x = jax.random.normal(k1, (n, k), jnp.bfloat16), jax.random.normal(k2, (k,), jnp.bfloat16)
    assert _rel_err(gemv_mosaic(w, x), gemv_reference(w, x)) < TOL[jnp.bfloat16]


def _s8_inputs(n, k, int4=False):
    """Weights (int8 and a row scale, or Q4_0 bytes and f16 group scales), x's int8 codes and block scales."""
    k1, k2, k3, k4 = jax.random.split(_key(), 4)
    if int4:
        q = jax.random.randint(k1, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        scale = (0.01 + 0.01 * jax.random.uniform(k3, (n, k // 32))).astype(jnp.float16)
    else:
        q = jax.random.randint(k1, (n, k), -127, 128, jnp.int32).astype(jnp.int8)
        scale = 0.01 + 0.01 * jax.random.uniform(k3, (n,))
    x_codes = jax.random.randint(k2, (k,), -127, 128, jnp.int32).astype(jnp.int8)
    return q, scale, x_codes, 0.01 + 0.01 * jax.random.uniform(k4, (k // 32,))


def _tiles_times_block_diagonal(w, operand):
    """Per 256-wide tile, the (rows, 256) x (256, columns) integer product a tile's WGMMA makes: (tiles, rows,
    columns)."""
    w, operand = np.asarray(w, np.int64), np.asarray(operand, np.int64)
    return np.stack([w[:, t : t + 256] @ operand[:, t : t + 256].T for t in range(0, w.shape[1], 256)])


def test_s8_operands_give_block_sums():
    """gemv_s8_mosaic's contract with its x operand: a tile's product with the block-diagonal codes puts its 8
    block dot products in 8 columns, which x's block scales then weight. Emulated in integers (the kernel
    itself needs the GPU's tensor cores)."""
    from pallas_kernels.gemv_s8_mosaic import block_diagonal, gemv_s8_reference

    q, row_scale, x_codes, x_scales = _s8_inputs(64, 1024)
    blocks = _tiles_times_block_diagonal(q, block_diagonal(x_codes, 32, 8))
    y = np.einsum("trc,tc->r", blocks, np.asarray(x_scales, np.float64).reshape(-1, 8)) * np.asarray(row_scale)
    ref = gemv_s8_reference(q, row_scale, x_codes, x_scales)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_s4_nibbles_and_operands_give_the_product():
    """gemv_s4_mosaic's contract, emulated in integers: with the high nibbles stored XOR 8, (w & 0xF0) read as
    int8 is 16 (n - 8) and (w & 0x0F) is n; against the block-diagonal halves of x they give each block's
    sums, the low ones 8 x (x's low half sum) too high."""
    from pallas_kernels.gemv_s8_mosaic import block_diagonal, gemv_s4_reference, prepare_int4

    q, scales, x_codes, x_scales = _s8_inputs(64, 2048, int4=True)
    w = np.asarray(prepare_int4(q))
    halves = np.asarray(x_codes).reshape(-1, 2, 16)
    low, high = (_tiles_times_block_diagonal(part, block_diagonal(jnp.asarray(halves[:, h].reshape(-1)), 16, 16))
                 for h, part in ((0, w & 0x0F), (1, w & np.int8(-16))))  # fmt: skip
    low = low - 8 * halves[:, 0].sum(axis=1).reshape(-1, 16)[:, None, :]
    per_block = (low + high / 16) * np.asarray(x_scales, np.float64).reshape(-1, 1, 16)
    y = np.einsum("trc,rtc->r", per_block, np.asarray(scales, np.float64).reshape(64, -1, 16))
    ref = gemv_s4_reference(q, scales, x_codes, x_scales)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.skipif(not ON_GPU, reason="WGMMA needs a GPU")
@pytest.mark.parametrize("int4", [False, True])
@pytest.mark.parametrize("n,k,splits", [(128, 1024, 1), (4096, 4096, 2), (28672, 4096, 1), (4096, 14336, 2)])
def test_s8_mosaic_gemvs_match_reference(n, k, splits, int4):
    from pallas_kernels import gemv_s8_mosaic as s8

    q, scale, x_codes, x_scales = _s8_inputs(n, k, int4)
    if int4:
        out, ref = s8.gemv_s4_mosaic(s8.prepare_int4(q), scale, x_codes, x_scales, splits=splits), s8.gemv_s4_reference
    else:
        out, ref = s8.gemv_s8_mosaic(q, scale, x_codes, x_scales, splits=splits), s8.gemv_s8_reference
    assert _rel_err(out, ref(q, scale, x_codes, x_scales)) < TOL[jnp.float32]


def _pair_inputs(pairs, hidden, dim):
    ka, kb, kx = jax.random.split(_key(), 3)
    a = (jax.random.normal(ka, (pairs, hidden, dim)) / np.sqrt(dim)).astype(jnp.bfloat16)
    b = (jax.random.normal(kb, (pairs, dim, hidden)) / np.sqrt(hidden)).astype(jnp.bfloat16)
    return a, b, jax.random.normal(kx, (dim,))


def test_pair_arrangement_walks_to_the_chain():
    """gemv_pair_chain's contract with arrange_pairs, emulated in numpy as the kernel walks the tiles: CTA j's
    A tiles give its 64 rows of u, and each B tile's four 64-column segments against u give y's rows
    s * D/4 + t * 64 + (0..63). (The kernel itself needs the GPU: its grid barrier.)"""
    from pallas_kernels.gemv_pair_mosaic import TILE, arrange_pairs, gemv_pair_chain_reference

    (bn, bk), (hidden, dim) = TILE, (1024, 1024)
    a, b, x = _pair_inputs(1, hidden, dim)
    ctas, tiles = hidden // bn, dim // bk
    w = np.asarray(arrange_pairs(a, b), np.float64).reshape(2, ctas, tiles, bn, bk)
    x = np.asarray(x, np.float64)
    y = np.zeros(dim)
    for j in range(ctas):
        u = sum(w[0, j, t] @ x[bk * t : bk * t + bk] for t in range(tiles))
        for t in range(tiles):
            for s in range(4):
                rows = w[1, j, t][:, bn * s : bn * s + bn] @ u
                y[s * dim // 4 + t * bn + np.arange(bn)] += rows
    ref = np.asarray(gemv_pair_chain_reference(a, b, jnp.asarray(x, jnp.float32))[0])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.skipif(not ON_GPU, reason="a grid barrier needs every CTA resident: a GPU")
@pytest.mark.parametrize("pairs,hidden,dim", [(1, 1024, 1024), (3, 8192, 4096)])
def test_pair_chain_matches_reference(pairs, hidden, dim):
    """Twice in a row: the barrier's semaphores must be back at 0 after a call."""
    from pallas_kernels.gemv_pair_mosaic import arrange_pairs, gemv_pair_chain, gemv_pair_chain_reference

    a, b, x = _pair_inputs(pairs, hidden, dim)
    ref = gemv_pair_chain_reference(a, b, x)
    for _ in range(2):
        out = gemv_pair_chain(arrange_pairs(a, b), x)
        assert _rel_err(out, ref) < TOL[jnp.float32]


def _check_attention(n_heads, n_kv, t, hd, length, window, dtype, config, cache_dtype=None):
    k1, k2, k3 = jax.random.split(_key(), 3)
    q = jax.random.normal(k1, (n_heads, hd), dtype)
    kc = jax.random.normal(k2, (n_kv, t, hd), jnp.float32).astype(cache_dtype or dtype)
    vc = jax.random.normal(k3, (n_kv, t, hd), jnp.float32).astype(cache_dtype or dtype)
    if t > length:  # unwritten slots may hold anything: the kernel must not let them through
        kc = kc.at[:, length:].set(jnp.nan)
        vc = vc.at[:, length:].set(jnp.nan)

    def run(q, kc, vc, length):
        poisoned = jnp.full(q.shape, jnp.nan, q.dtype)
        return decode_attention(q, kc, vc, length, window=window, config=config, out=poisoned, interpret=INTERPRET)

    out = jax.jit(run)(q, kc, vc, jnp.int32(length))
    ref = decode_attention_reference(q, _finite(kc), _finite(vc), length, window=window)
    assert out.shape == (n_heads, hd) and out.dtype == dtype
    assert _rel_err(out, ref) < TOL[dtype]


def _finite(cache):
    return jnp.where(jnp.isnan(cache.astype(jnp.float32)), 0, cache).astype(cache.dtype)  # nan_to_num, fp8 too


SMALL_ATTN = (16, 32, 4, 2)  # block_t, split_t, num_warps, num_stages: grid (2 kv heads, 4 splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n_heads,length,window",
    [(8, 100, None), (8, 1, None), (8, 128, None), (6, 70, 20), (2, 45, None)],
    ids=["gqa4", "first_token", "full", "window_gqa3", "mha"],
)
def test_decode_attention_matches_reference_small(dtype, n_heads, length, window):
    _check_attention(n_heads, 2, 128, 32, length, window, dtype, SMALL_ATTN)


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_decode_attention_f32_query_over_a_narrow_cache(cache_dtype):
    """An f32 query over a bf16 or fp8 cache multiplies in three bf16 terms (attention_operands): within f32's
    tolerance of the f32 reference over the same cache values."""
    assert attention_operands(jnp.float32, cache_dtype) == (jnp.bfloat16, 3)
    _check_attention(8, 2, 128, 32, 100, None, jnp.float32, SMALL_ATTN, cache_dtype)
    _check_attention(6, 2, 128, 32, 70, 20, jnp.float32, SMALL_ATTN, cache_dtype)


def test_split_terms_sum_to_the_value():
    x = jax.random.normal(_key(), (4096,), jnp.float32) * jnp.exp(jax.random.normal(_key(), (4096,)) * 8)
    terms = split_terms(x, jnp.bfloat16, 3)
    assert all(t.dtype == jnp.bfloat16 for t in terms)
    total = sum(np.asarray(t, np.float64) for t in terms)
    np.testing.assert_allclose(total, np.asarray(x, np.float64), rtol=2**-23, atol=0)
    assert np.abs(np.asarray(terms[0], np.float64) - np.asarray(x, np.float64)).max() > 0  # one term is not x


@pytest.mark.parametrize("length,window", [(500, None), (500, 420)], ids=["32_splits", "27_splits_from_the_sixth"])
def test_decode_attention_merges_more_splits_than_a_load(length, window):
    # Splits of 16 slots: more active splits than the merge loads at once, and with the window a first split
    # that is not the first of a load.
    assert -(-length // 16) > merge_splits(16, 16) > 1
    _check_attention(8, 2, 512, 16, length, window, jnp.float32, (16, 16, 4, 2))


TF32X3 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
# Attention tiles compiled on an H100 (an H200 for the first): (rows, block_t, head_dim, stages, dot bytes,
# precision) and the shared memory Triton requested where it refused them (KERNEL_NOTES.md runs 29 and 30), or
# None where they ran.
MEASURED_TILES = [
    ((128, 128, 128, 2, 4, None), 327680),  # prefill, Mistral-7B, f32 dots on the CUDA cores
    ((128, 64, 128, 2, 4, TF32X3), 262144),  # the same as three TF32 products
    ((128, 16, 256, 2, 4, TF32X3), 327680),  # prefill, Gemma 3's head
    ((64, 32, 256, 2, 4, TF32X3), 262144),
    ((32, 64, 256, 2, 4, TF32X3), 344064),
    ((64, 64, 256, 1, 4, TF32X3), 262144),
    ((128, 32, 256, 1, 4, TF32X3), 327680),
    ((128, 128, 256, 2, 2, None), 327680),  # bf16
    ((16, 64, 256, 3, 4, TF32X3), 434176),  # decode, Gemma 3's head
    ((16, 32, 256, 3, 4, TF32X3), 233472),
    ((128, 32, 128, 2, 4, TF32X3), None),
    ((128, 128, 64, 2, 4, TF32X3), None),  # prefill, SmolLM2
    ((64, 16, 256, 2, 4, TF32X3), None),
    ((32, 32, 256, 2, 4, TF32X3), None),
    ((64, 32, 256, 1, 4, TF32X3), None),
    ((128, 64, 256, 2, 2, None), None),
    ((128, 128, 128, 2, 2, None), None),
    ((16, 32, 256, 2, 4, TF32X3), None),  # decode
    ((16, 16, 256, 3, 4, TF32X3), None),
    ((16, 64, 128, 3, 4, TF32X3), None),
    ((16, 64, 256, 3, 2, None), None),
]


@pytest.mark.parametrize("tile,requested", MEASURED_TILES)
def test_attention_tile_bytes_match_the_cards_refusals(tile, requested):
    # The count matches each refusal to the byte and puts every tile that ran under the limit.
    need = tile_smem_bytes(*tile)
    if requested is None:
        assert need <= SMEM_LIMIT
    else:
        assert need == requested and need > SMEM_LIMIT


def test_decode_attention_tiles_shrink_to_fit():
    # Gemma 3's f32 head drops to two stages, then to blocks of 32 (of the tiles that ran, the fastest); 16-bit
    # heads of 256 and f32 heads of 128 and 64 keep the default tile.
    bt, _, _, stages = DEFAULT_CONFIG
    assert decode_tile_that_fits(bt, stages, 16, 256, 4, TF32X3) == (32, 2)
    assert decode_tile_that_fits(bt, stages, 16, 256, 2) == (bt, stages)
    assert decode_tile_that_fits(bt, stages, 16, 128, 4, TF32X3) == (bt, stages)
    assert decode_tile_that_fits(bt, stages, 16, 64, 4, TF32X3) == (bt, stages)


@pytest.mark.parametrize(
    "attn_len,split_16bit,split_f32",
    [(128, 256, 64), (256, 256, 64), (512, 64, 64), (1024, 128, 64), (2048, 128, 128), (4096, 256, 256)],
)
def test_decode_splits_by_bucket(attn_len, split_16bit, split_f32):
    # The fastest splits of 1-8 blocks at buckets of 128-4,096 slots on an H100 (KERNEL_NOTES.md run 31): f32's
    # three TF32 products make a block step dear, so its splits hold one block further; 16-bit keeps one split
    # while a merge costs more than the blocks it would take off the chain.
    block_t, _, num_warps, num_stages = DEFAULT_CONFIG
    for dtype, split_t in ((jnp.bfloat16, split_16bit), (jnp.float16, split_16bit), (jnp.float32, split_f32)):
        assert config_for(attn_len, jnp.dtype(dtype)) == (block_t, split_t, num_warps, num_stages)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_head_dim_256(dtype):
    # Gemma 3's head, on the default tiles (in f32 the shorter blocks above): one kv head of four queries.
    _check_attention(4, 1, 256, 256, 200, None, dtype, None)


def test_decode_attention_length_is_traced():
    # One compiled program serves every position.
    k1, k2 = jax.random.split(_key())
    q = jax.random.normal(k1, (4, 16), jnp.float32)
    kv = jax.random.normal(k2, (2, 64, 16), jnp.float32)
    f = jax.jit(lambda length: decode_attention(q, kv, kv, length, config=SMALL_ATTN, interpret=INTERPRET))
    for length in (3, 40):
        ref = decode_attention_reference(q, kv, kv, length)
        assert _rel_err(f(jnp.int32(length)), ref) < TOL[jnp.float32]
    assert f._cache_size() == 1


@pytest.mark.skipif(not ON_GPU, reason="real shapes need a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length,window", [(1, None), (128, None), (3000, None), (4096, None), (4096, 1024)])
def test_decode_attention_matches_reference_real(dtype, length, window):
    _check_attention(32, 8, 4096, 128, length, window, dtype, None)


@pytest.mark.skipif(not ON_GPU, reason="real shapes need a GPU")
@pytest.mark.parametrize("n_heads,n_kv,hd", [(32, 8, 128), (4, 1, 256)], ids=["mistral", "gemma3"])
@pytest.mark.parametrize("length", [128, 3000])
def test_decode_attention_f32_query_over_a_bf16_cache_real(n_heads, n_kv, hd, length):
    _check_attention(n_heads, n_kv, 4096, hd, length, None, jnp.float32, None, jnp.bfloat16)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["qwen2", "qwen3"])
def test_model_decode_pallas_matches_xla(qk_norm, monkeypatch):
    """A tiny model's prefill and decode step through backend="pallas" give the xla path's logits.

    Splits of 16 slots make the decode step's 41 positions span three splits in each of the two layers,
    so both layers merge their splits through the one counter the model threads between them."""
    from pallas_kernels import decode_attention as attn_mod
    from yalm_jax import model
    from yalm_jax.config import ModelConfig
    from yalm_jax.weights import LayerWeights, Weights

    monkeypatch.setattr(attn_mod, "config_for", lambda attn_len, dot_dtype: (16, 16, 4, 2))
    cfg = ModelConfig(
        arch="qwen3" if qk_norm else "qwen2", vocab_size=64, dim=64, hidden_dim=128, n_layers=2, n_heads=6,
        n_kv_heads=2, head_dim=32, norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
        qkv_bias=not qk_norm, qk_norm=qk_norm, dtype="float32",
    )  # fmt: skip
    keys = iter(jax.random.split(_key(), 32))

    def rnd(*shape, scale=0.2):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    qkv = cfg.q_dim + 2 * cfg.kv_dim
    layers = [
        LayerWeights(
            attn_norm=1 + rnd(cfg.dim), wqkv=rnd(qkv, cfg.dim), bqkv=None if qk_norm else rnd(qkv),
            wo=rnd(cfg.dim, cfg.q_dim), ffn_norm=1 + rnd(cfg.dim), w13=rnd(2 * cfg.hidden_dim, cfg.dim),
            w2=rnd(cfg.dim, cfg.hidden_dim), q_norm=1 + rnd(cfg.head_dim) if qk_norm else None,
            k_norm=1 + rnd(cfg.head_dim) if qk_norm else None,
        )
        for _ in range(cfg.n_layers)
    ]  # fmt: skip
    embed = rnd(cfg.vocab_size, cfg.dim, scale=1.0)
    weights = Weights(embed=embed, layers=layers, final_norm=1 + rnd(cfg.dim), lm_head=None)
    n = 40
    prompt = jax.random.randint(next(keys), (n,), 0, cfg.vocab_size)
    logits = {}
    for backend in ("xla", "pallas"):
        cache = model.init_cache(cfg, 64)
        pre, cache = model.forward(weights, cache, prompt, jnp.arange(n), cfg=cfg, backend=backend)
        out, _ = model.forward(weights, cache, prompt[:1], jnp.array([n]), cfg=cfg, backend=backend)
        logits[backend] = pre, out
    # The prefill chunk (flash-attention kernel) and the decode step after it (decode kernels, reading
    # the cache the chunk wrote) both give the xla path's logits.
    for got, want in zip(logits["pallas"], logits["xla"]):
        assert _rel_err(got, want) < 1e-5


def _model_qk(q, k, pos, inv_freq, qk_norm):
    """The model's query/key preparation (ops.rms_norm per head, then ops.rope), in f32: the kernel's reference."""
    from yalm_jax import ops

    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if qk_norm is not None:
        wq, wk, eps = qk_norm
        q, k = ops.rms_norm(q, wq.astype(jnp.float32), eps), ops.rms_norm(k, wk.astype(jnp.float32), eps)
    positions = jnp.array([pos])
    return ops.rope(q[None], positions, inv_freq)[0], ops.rope(k[None], positions, inv_freq)[0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "n_heads,pos,window,scale,qk_norm",
    [(8, 0, None, None, False), (6, 37, None, None, False), (8, 127, None, None, True), (6, 90, 30, None, True),
     (8, 60, None, 0.37, False)],
    ids=["first", "mid_gqa3", "last_qknorm", "window_gqa3_qknorm", "scale"],
)  # fmt: skip
def test_decode_attention_update_writes_the_token(dtype, n_heads, pos, window, scale, qk_norm):
    """The fused form takes the projection's rows as they are: it norms and rotates the queries and the
    new key as the model does, attends over slots < pos plus the new token, and writes it into slot pos."""
    from pallas_kernels.decode_attention import decode_attention_update

    n_kv, t, hd = 2, 144, 32  # the last of the 5 splits is short
    k1, k2, k3, k4, k5, k6 = jax.random.split(_key(), 6)
    qkv = jax.random.normal(k1, (n_heads + 2 * n_kv, hd), dtype)
    kc = jax.random.normal(k2, (n_kv, t, hd), dtype).at[:, pos:].set(jnp.nan)  # slots >= pos are stale
    vc = jax.random.normal(k3, (n_kv, t, hd), dtype).at[:, pos:].set(jnp.nan)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, hd, 2, dtype=np.float32) / hd)
    norm = None
    if qk_norm:
        norm = (1 + 0.3 * jax.random.normal(k4, (hd,), dtype), 1 + 0.3 * jax.random.normal(k5, (hd,), dtype), 1e-6)
    f = jax.jit(
        lambda *a: decode_attention_update(
            *a, n_heads=n_heads, rope_inv_freq=inv_freq, qk_norm=norm, window=window, scale=scale,
            config=SMALL_ATTN, interpret=INTERPRET,
        ),
        donate_argnums=(1, 2),
    )  # fmt: skip
    q, kn = _model_qk(qkv[:n_heads], qkv[n_heads : n_heads + n_kv], pos, inv_freq, norm)
    vn = qkv[n_heads + n_kv :]
    k_ref = jnp.nan_to_num(kc).astype(jnp.float32).at[:, pos].set(kn)
    v_ref = jnp.nan_to_num(vc).at[:, pos].set(vn)
    out, kc2, vc2, counter = f(qkv, kc, vc, jnp.int32(pos))  # kc, vc are donated
    ref = decode_attention_reference(q, k_ref, v_ref, pos + 1, window=window, scale=scale)
    assert _rel_err(out, ref) < TOL[dtype]
    assert _rel_err(kc2[:, pos], kn) < TOL[dtype] / 2  # the stored key: rotated, rounded once to the cache dtype
    np.testing.assert_array_equal(np.asarray(vc2[:, pos], np.float32), np.asarray(vn, np.float32))
    np.testing.assert_array_equal(np.asarray(kc2[:, :pos], np.float32), np.asarray(k_ref[:, :pos], np.float32))
    assert np.isnan(np.asarray(kc2[:, pos + 1 :], np.float32)).all()  # nothing else touched
    # The split counter comes back zeroed, so the next token's call (the next layer's, in a model) reuses it.
    np.testing.assert_array_equal(np.asarray(counter), 0)
    qkv2 = jax.random.normal(k6, (n_heads + 2 * n_kv, hd), dtype)
    q2, kn2 = _model_qk(qkv2[:n_heads], qkv2[n_heads : n_heads + n_kv], pos + 1, inv_freq, norm)
    out2, kc3, vc3, counter = f(qkv2, kc2, vc2, jnp.int32(pos + 1), counter)
    k_ref = jnp.nan_to_num(kc3).astype(jnp.float32).at[:, pos + 1].set(kn2)
    ref2 = decode_attention_reference(q2, k_ref, jnp.nan_to_num(vc3), pos + 2, window=window, scale=scale)
    assert _rel_err(out2, ref2) < TOL[dtype]
    np.testing.assert_array_equal(np.asarray(counter), 0)
