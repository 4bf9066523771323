"""Causal attention of a chunk of S queries over a KV cache (flash attention, prefill).

q: (S, n_heads, hd), the queries of positions q_start .. q_start + S - 1 (q_start
a traced scalar); k_cache, v_cache: (n_kv, T, hd), slot t holding position t,
the chunk's own keys and values already written at slots q_start .. q_start + S - 1.
The query at position p sees slots t <= p (and t > p - window with a sliding
window); slots from q_start + S on may hold anything.

The grid is (n_kv, cdiv(S, block_q)). The query heads that share a kv head
(GQA) are arranged outside the kernel as (n_kv, rows, hd), position-major and
head-minor, the group padded to a power of two: a program takes `block_q`
positions x the group, block_rows = block_q * group rows, as the rows of its
tensor-core dots, so a block of K and V serves every head of the group. It walks
the key blocks of `block_k` slots from the window's start (or 0) up to its last
position with an online softmax in f32, and never materialises the scores: the
loop bounds come from q_start, so blocks past the chunk (or before the window)
are never read. Only the blocks that straddle the causal diagonal or the
window's edge are masked (scores set to -inf, and v zeroed outside the
program's slot range so that garbage there cannot turn 0 * v into NaN); the
blocks in between, which every row sees whole, run without a mask. The rows
that pad the last q block repeat the last valid position, so they stay finite.

`prefill_attention_reference` is the same function in plain jnp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.decode_attention import (
    SMEM_LIMIT,
    attention_dot_precision,
    attention_operands,
    dot_terms,
    split_terms,
    tile_smem_bytes,
)
from pallas_kernels.gemv import _pow2_divisor

# (block_rows, block_k, num_warps, num_stages): the best of a first sweep on one H100 80GB HBM3 (2026-11-25,
# a 512-token Mistral-7B chunk at starts 0 and 1024, bf16), timed call by call (dispatch included).
DEFAULT_CONFIG = (128, 128, 8, 2)
MIN_ROWS = 16  # rows of a tensor-core dot
# Tiles that do not fit keep blocks of 32 keys before they lose rows: of an f32 chunk's tiles on an H100, blocks
# of 16 ran 1.4x (Mistral-7B, 128 rows) and 1.6x (Gemma 3, 32 rows) slower than 32 (KERNEL_NOTES.md run 30).
MIN_BLOCK_K = 32
# Hopper's tensor-core dot (wgmma) takes 64 rows a warpgroup of 4 warps: fewer rows a warpgroup ran slower (f32
# tiles of 16-64 rows on 8 warps 1.1-1.3x, a bf16 tile of 64 rows 1.45x; run 30).
ROWS_PER_WARPGROUP = 64
# Programs in one wave on an H100 or H200 (132 SMs). A chunk with few programs a wave (short chunks, or few kv
# heads) takes fewer rows a program, halved while the programs still fit one wave: each program's walk over the
# keys is a chain, and more of them shorten none of it but use idle SMs. Measured over 16-128 rows on Mistral-7B's,
# SmolLM2's and Gemma 3's heads (8, 3 and 1 kv heads), chunks of 64 and 512 tokens, bf16 and f32 (an H100,
# KERNEL_NOTES.md run 31): the rule picks the fastest of the five in all 12 cases, 1.29-2.19x faster than the
# tile before it in the 10 it changes.
WAVE_PROGRAMS = 132
# The running max starts finite, so a row whose keys in a block are all masked gets
# exp(-inf - m) = 0 and alpha = 1 instead of exp(-inf - -inf) = NaN.
M_INIT = float(jnp.finfo(jnp.float32).min)


def supported(t: int, hd: int) -> bool:
    """Shapes the kernel handles: a power-of-two head_dim >= 16, and T a multiple of 16."""
    return hd >= 16 and hd & (hd - 1) == 0 and t % 16 == 0


def _prefill_kernel(start_ref, q_ref, k_ref, v_ref, *refs, s, bq, gp, bk, window, scale, dot_dtype, terms, precision):
    o_ref = refs[-1]  # a leading ref is a poison buffer aliased to it (tests)
    q_start = start_ref[0]
    block = pl.cdiv(s, bq) - 1 - pl.program_id(1)  # the last q blocks, with the most keys, start first
    p_lo = q_start + block * bq  # position of the block's first row
    p_last = jnp.minimum(p_lo + bq, q_start + s) - 1  # and of its last valid one
    lo = 0 if window is None else jnp.maximum(p_lo - window + 1, 0)
    hi = p_last + 1  # the program reads slots [lo, hi)
    blk_lo = lax.div(lo, bk)
    blk_hi = lax.div(hi + bk - 1, bk)
    # The blocks that every row sees whole: slots within [p_last - window + 1, p_lo].
    full_lo = blk_lo
    if window is not None:
        full_lo = jnp.minimum(lax.div(jnp.maximum(p_last - window + 1, 0) + bk - 1, bk), blk_hi)
    full_hi = jnp.maximum(jnp.minimum(lax.div(p_lo + 1, bk), blk_hi), full_lo)

    rows, hd = q_ref.shape
    q_terms = split_terms(q_ref[...], dot_dtype, terms)
    f32 = jnp.float32
    # Row r holds position p_lo + r // gp; padding rows past the chunk repeat its last position.
    pos_q = jnp.minimum(p_lo + lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), gp), p_last)

    def body(b, carry, masked):
        m, l, acc = carry
        t0 = pl.multiple_of(b * bk, bk)
        k = k_ref[pl.ds(t0, bk), :].astype(dot_dtype)
        v = v_ref[pl.ds(t0, bk), :].astype(dot_dtype)
        scores = dot_terms(q_terms, k, precision, trans_b=True) * scale
        if masked:
            pos_k = t0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
            visible = pos_k[None, :] <= pos_q[:, None]
            if window is not None:
                visible &= pos_k[None, :] > pos_q[:, None] - window
            scores = jnp.where(visible, scores, -jnp.inf)
            in_range = (pos_k >= lo) & (pos_k < hi)
            v = jnp.where(in_range[:, None], v, jnp.zeros_like(v))  # unwritten slots may hold anything
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + dot_terms(split_terms(p, dot_dtype, terms), v, precision)
        return m_new, l, acc

    carry = (jnp.full((rows,), M_INIT, f32), jnp.zeros((rows,), f32), jnp.zeros((rows, hd), f32))
    carry = lax.fori_loop(blk_lo, full_lo, functools.partial(body, masked=True), carry)  # window's edge
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    _, l, acc = lax.fori_loop(full_hi, blk_hi, functools.partial(body, masked=True), carry)  # diagonal
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def _group_rows(x, n_kv: int, gp: int, s_pad: int):
    """(S, n_heads, hd) -> (n_kv, s_pad * gp, hd): rows position-major, head-minor, zero-padded."""
    s, n_heads, hd = x.shape
    g = n_heads // n_kv
    x = x.reshape(s, n_kv, g, hd).swapaxes(0, 1)
    x = jnp.pad(x, ((0, 0), (0, s_pad - s), (0, gp - g), (0, 0)))
    return x.reshape(n_kv, s_pad * gp, hd)


def tile_that_fits(bq: int, bk: int, gp: int, hd: int, num_stages: int, itemsize: int, precision=None, terms=1):
    """(block_q, block_k) cut until the tiles (bq * gp rows) fit SMEM_LIMIT: block_k halved down to
    MIN_BLOCK_K, then the rows down to MIN_ROWS, then block_k to MIN_ROWS."""
    def fits(bq, bk):
        return tile_smem_bytes(bq * gp, bk, hd, num_stages, itemsize, precision, terms) <= SMEM_LIMIT

    while not fits(bq, bk):
        if bk > MIN_BLOCK_K:
            bk //= 2
        elif bq * gp > MIN_ROWS and bq > 1:
            bq //= 2
        elif bk > MIN_ROWS:
            bk //= 2
        else:
            break
    return bq, bk


def launch_config(config, s: int, t: int, n_kv: int, gp: int, hd: int, itemsize: int, precision=None, terms=1):
    """(block_q, block_k, num_warps, num_stages) for a chunk of s queries over t slots of n_kv heads: `config`'s
    (default DEFAULT_CONFIG) block_rows as whole groups of gp query heads, at least MIN_ROWS rows and at most the
    chunk, halved while the n_kv x cdiv(s, block_q) programs fit WAVE_PROGRAMS; block_k a power of two that
    divides t; the tile cut until it fits (tile_that_fits); at most a warpgroup for each ROWS_PER_WARPGROUP rows."""
    block_rows, bk, num_warps, num_stages = config or DEFAULT_CONFIG
    bq = min(max(block_rows // gp, 1), pl.next_power_of_2(s))
    bq = max(bq, pl.cdiv(MIN_ROWS, gp))
    while bq // 2 * gp >= MIN_ROWS and n_kv * pl.cdiv(s, bq // 2) <= WAVE_PROGRAMS:
        bq //= 2
    bq, bk = tile_that_fits(bq, _pow2_divisor(t, bk), gp, hd, num_stages, itemsize, precision, terms)
    return bq, bk, min(num_warps, 4 * max(1, bq * gp // ROWS_PER_WARPGROUP)), num_stages


def prefill_attention(q, k_cache, v_cache, q_start, *, window=None, scale=None, config=None, out=None, interpret=False):
    """softmax(q K^T * scale) V, causal (and windowed) over the cache; returns (S, n_heads, hd) in q's dtype.

    Scores are q.k * scale (default head_dim ** -0.5), the softmax in f32; 16-bit
    operands multiply on tensor cores with f32 accumulation, f32 ones as three TF32
    products (attention_dot_precision), an f32 query over a bf16 or fp8 cache as three
    bf16 terms (attention_operands). An fp8 cache's blocks are upcast as loaded.
    `config` = (block_rows, block_k, num_warps, num_stages), fitted to the shapes
    and the shared memory by launch_config. `out`, if given,
    is an (S, n_heads, hd) buffer in q's dtype aliased to the result (tests fill it
    with NaN to catch unwritten rows).
    """
    s, n_heads, hd = q.shape
    n_kv, t, _ = k_cache.shape
    gp = pl.next_power_of_2(n_heads // n_kv)
    dt, terms = attention_operands(q.dtype, k_cache.dtype)
    precision = attention_dot_precision(dt, interpret)
    bq, bk, num_warps, num_stages = launch_config(config, s, t, n_kv, gp, hd, dt.itemsize, precision, terms)
    n_blocks = pl.cdiv(s, bq)
    rows = bq * gp
    qg = _group_rows(q.astype(dt) if terms == 1 else q, n_kv, gp, n_blocks * bq)  # split in the kernel
    q_start = jnp.asarray(q_start, jnp.int32).reshape(1)

    row_spec = pl.BlockSpec((None, rows, hd), lambda h, i: (h, n_blocks - 1 - i, 0))
    kv_spec = pl.BlockSpec((None, t, hd), lambda h, i: (h, 0, 0))
    operands = [q_start, qg, k_cache, v_cache]
    in_specs = [pl.BlockSpec((1,), lambda h, i: (0,)), row_spec, kv_spec, kv_spec]
    aliases = {}
    if out is not None:
        aliases = {len(operands): 0}
        operands.append(_group_rows(out.astype(q.dtype), n_kv, gp, n_blocks * bq))
        in_specs.append(row_spec)

    kernel = functools.partial(
        _prefill_kernel, s=s, bq=bq, gp=gp, bk=bk, window=window, scale=hd**-0.5 if scale is None else scale,
        dot_dtype=dt, terms=terms, precision=precision,
    )
    o = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        grid=(n_kv, n_blocks),
        in_specs=in_specs,
        out_specs=row_spec,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="prefill_attention",
    )(*operands)
    o = o.reshape(n_kv, n_blocks * bq, gp, hd)[:, :s, : n_heads // n_kv]
    return o.swapaxes(0, 1).reshape(s, n_heads, hd)


def prefill_attention_reference(q, k_cache, v_cache, q_start, *, window=None, scale=None):
    """The same function in plain jnp: f32 scores and softmax; slots no query sees are never used."""
    s, n_heads, hd = q.shape
    n_kv, t, _ = k_cache.shape
    qg = q.reshape(s, n_kv, n_heads // n_kv, hd).astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    scale = hd**-0.5 if scale is None else scale
    scores = jnp.einsum("skgd,ktd->kgst", qg, k_cache.astype(jnp.float32), precision=hi) * scale
    pos_q = q_start + jnp.arange(s)[:, None]
    pos_k = jnp.arange(t)[None, :]
    visible = pos_k <= pos_q
    if window is not None:
        visible &= pos_k > pos_q - window
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    v = jnp.where(jnp.any(visible, axis=0)[None, :, None], v_cache.astype(jnp.float32), 0.0)
    out = jnp.einsum("kgst,ktd->skgd", probs, v, precision=hi)
    return out.reshape(s, n_heads, hd).astype(q.dtype)
