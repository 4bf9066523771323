"""Attention of one query token over a KV cache (flash-decoding).

q: (n_heads, hd); k_cache, v_cache: (n_kv, T, hd), slot t holding position t.
The `length` first slots are valid (length = position + 1, a traced scalar);
with a sliding `window`, only the last `window` of them are.

The grid is (n_kv, n_splits): each program takes one kv head and one split of
the sequence. The query heads that share a kv head (GQA) are processed
together, padded to a group of at least 16 rows so QK^T and PV are tensor-core
dots, so K and V are read once per kv head. A program walks its split in blocks
of `block_t` slots with an online softmax in f32, and only over the blocks that
hold valid slots: the loop bounds come from `length`, so blocks past it are
never read. Each program writes its partial (max, sum, output); a small jnp
step combines the splits.

`decode_attention_reference` is the same function in plain jnp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# Measured on one H100 80GB HBM3 (see KERNEL_NOTES.md): (block_t, split_t, num_warps, num_stages).
DEFAULT_CONFIG = (128, 512, 4, 2)
MIN_GROUP = 16  # rows of a tensor-core dot


def _pow2_divisor(n: int, cap: int) -> int:
    return min(cap, n & -n)


def supported(t: int, hd: int) -> bool:
    """Shapes the kernel handles: a power-of-two head_dim >= 16, and T a multiple of 16."""
    return hd >= 16 and hd & (hd - 1) == 0 and t % 16 == 0


def _partials_kernel(len_ref, q_ref, k_ref, v_ref, *refs, bt, split_t, window, scale, has_new):
    if has_new:
        # The new token's key and value, and the caches again (aliased to two extra outputs).
        kn_ref, vn_ref = refs[:2]
        acc_ref, m_ref, l_ref, k_out, v_out = refs[-5:]
    else:
        acc_ref, m_ref, l_ref = refs[-3:]  # any leading refs are poison buffers aliased to these
    s = pl.program_id(1)
    length = len_ref[0]
    # With a new token, the cache holds valid slots below length - 1 and the token itself is slot length - 1.
    cached = length - 1 if has_new else length
    lo = s * split_t
    hi = jnp.minimum(lo + split_t, cached)
    if window is not None:
        lo = jnp.maximum(lo, length - window)
    blk_lo = lax.div(lo, bt)
    blk_hi = lax.div(hi + bt - 1, bt)

    q = q_ref[...]
    gp, hd = q.shape
    f32 = jnp.float32
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(b, carry):
        m, l, acc = carry
        t0 = pl.multiple_of(b * bt, bt)
        pos = t0 + lax.broadcasted_iota(jnp.int32, (bt,), 0)
        valid = pos < cached
        if window is not None:
            valid &= pos >= length - window
        k = k_ref[pl.ds(t0, bt), :]
        scores = plt.dot(q, k.astype(q.dtype), trans_b=True, precision=precision) * scale
        scores = jnp.where(valid[None, :], scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(t0, bt), :].astype(q.dtype)
        v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # unwritten slots may hold anything
        acc = alpha[:, None] * acc + plt.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, l, acc

    init = (jnp.full((gp,), -jnp.inf, f32), jnp.zeros((gp,), f32), jnp.zeros((gp, hd), f32))
    m, l, acc = lax.fori_loop(blk_lo, blk_hi, body, init)
    if has_new:
        # The split holding slot length - 1 adds the new token and writes it into the cache.
        owner = s == lax.div(length - 1, split_t)
        kn = kn_ref[...]
        vn = vn_ref[...]
        s_new = jnp.sum(q.astype(f32) * kn.astype(f32)[None, :], axis=1) * scale
        m2 = jnp.maximum(m, s_new)
        alpha = jnp.exp(m - m2)
        p_new = jnp.exp(s_new - m2)
        m = jnp.where(owner, m2, m)
        l = jnp.where(owner, alpha * l + p_new, l)
        acc = jnp.where(owner, alpha[:, None] * acc + p_new[:, None] * vn.astype(f32)[None, :], acc)

        @pl.when(owner)
        def _():
            k_out[pl.ds(length - 1, 1), :] = kn[None, :].astype(k_out.dtype)
            v_out[pl.ds(length - 1, 1), :] = vn[None, :].astype(v_out.dtype)

    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def decode_attention_partials(
    q, k_cache, v_cache, length, *, k_new=None, v_new=None, window=None, scale=None, config=None, init=None,
    interpret=False,
):
    """Per split: (acc (n_kv, S, Gp, hd), m (n_kv, S, Gp), l (n_kv, S, Gp)), all f32.

    Scores are q.k * scale (default head_dim ** -0.5). acc is the unnormalised sum of exp(score - m) * v over the split's valid
    slots; a split with none has m = -inf, l = 0, acc = 0. `init`, if given, is a
    tuple of buffers of those shapes aliased to the outputs (tests poison them).

    With `k_new`, `v_new` (n_kv, hd), the token at position length - 1 is not in
    the cache yet: the kernel attends over slots < length - 1 plus the new token,
    writes the token into slot length - 1 of the caches (aliased, in place), and
    returns the two updated caches after the partials.
    """
    n_heads, hd = q.shape
    n_kv, t, _ = k_cache.shape
    group = n_heads // n_kv
    gp = max(MIN_GROUP, pl.next_power_of_2(group))
    bt, split_t, num_warps, num_stages = config or DEFAULT_CONFIG
    bt = _pow2_divisor(t, bt)
    split_t = max(bt, min(split_t, t) // bt * bt)
    n_splits = pl.cdiv(t, split_t)

    # q and the cache meet in the wider of their dtypes (an f32 dot is exact, not tf32);
    # an fp8 cache (no implicit promotion) is upcast to q's dtype as each block is loaded.
    fp8_cache = jnp.dtype(k_cache.dtype).itemsize == 1
    qg = q.reshape(n_kv, group, hd).astype(q.dtype if fp8_cache else jnp.promote_types(q.dtype, k_cache.dtype))
    if gp != group:
        qg = jnp.pad(qg, ((0, 0), (0, gp - group), (0, 0)))
    length = jnp.asarray(length, jnp.int32).reshape(1)

    out_shape = (
        jax.ShapeDtypeStruct((n_kv, n_splits, gp, hd), jnp.float32),
        jax.ShapeDtypeStruct((n_kv, n_splits, gp), jnp.float32),
        jax.ShapeDtypeStruct((n_kv, n_splits, gp), jnp.float32),
    )
    out_specs = (
        pl.BlockSpec((None, None, gp, hd), lambda h, s: (h, s, 0, 0)),
        pl.BlockSpec((None, None, gp), lambda h, s: (h, s, 0)),
        pl.BlockSpec((None, None, gp), lambda h, s: (h, s, 0)),
    )
    kv_spec = pl.BlockSpec((None, t, hd), lambda h, s: (h, 0, 0))
    operands = [length, qg, k_cache, v_cache]
    in_specs = [
        pl.BlockSpec((1,), lambda h, s: (0,)),
        pl.BlockSpec((None, gp, hd), lambda h, s: (h, 0, 0)),
        kv_spec,
        kv_spec,
    ]
    has_new = k_new is not None
    if has_new:
        operands += [k_new, v_new]
        in_specs += [pl.BlockSpec((None, hd), lambda h, s: (h, 0))] * 2
    aliases = {}
    if init is not None:
        aliases = {len(operands) + i: i for i in range(3)}
        operands += list(init)
        in_specs += list(out_specs)
    if has_new:
        aliases |= {2: 3, 3: 4}
        out_shape += (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
        out_specs += (kv_spec, kv_spec)

    kernel = functools.partial(
        _partials_kernel, bt=bt, split_t=split_t, window=window, scale=hd**-0.5 if scale is None else scale,
        has_new=has_new,
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(n_kv, n_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(*operands)


def combine_partials(acc, m, l, n_heads: int, dtype) -> jax.Array:
    """Merge the splits' partial softmaxes into the output (n_heads, hd)."""
    n_kv, _, _, hd = acc.shape
    m_all = jnp.max(m, axis=1, keepdims=True)
    w = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - m_all))
    out = jnp.sum(w[..., None] * acc, axis=1) / jnp.sum(w * l, axis=1)[..., None]
    return out[:, : n_heads // n_kv].reshape(n_heads, hd).astype(dtype)


def decode_attention(q, k_cache, v_cache, length, *, window=None, scale=None, config=None, interpret=False):
    """softmax(q K^T * scale) V over the valid slots (scale defaults to 1 / sqrt(hd)); returns (n_heads, hd) in q's dtype."""
    acc, m, l = decode_attention_partials(
        q, k_cache, v_cache, length, window=window, scale=scale, config=config, interpret=interpret
    )
    return combine_partials(acc, m, l, q.shape[0], q.dtype)


def decode_attention_update(
    q, k_new, v_new, k_cache, v_cache, pos, *, window=None, scale=None, config=None, interpret=False
):
    """Attention of the token at position `pos` (q, k_new, v_new) over the cache, which it also enters.

    Reads slots < pos of the caches and the new key/value, and writes them into
    slot pos in the same kernel (the caches are updated in place when donated).
    Returns (out (n_heads, hd), k_cache, v_cache).
    """
    acc, m, l, k_cache, v_cache = decode_attention_partials(
        q, k_cache, v_cache, pos + 1, k_new=k_new, v_new=v_new, window=window, scale=scale, config=config,
        interpret=interpret,
    )
    return combine_partials(acc, m, l, q.shape[0], q.dtype), k_cache, v_cache


def decode_attention_reference(q, k_cache, v_cache, length, *, window=None, scale=None):
    """The same function in plain jnp: f32 scores and softmax over slots < length (and >= length - window)."""
    n_heads, hd = q.shape
    n_kv, t, _ = k_cache.shape
    qg = q.reshape(n_kv, n_heads // n_kv, hd).astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    scale = hd**-0.5 if scale is None else scale
    scores = jnp.einsum("kgd,ktd->kgt", qg, k_cache.astype(jnp.float32), precision=hi) * scale
    pos = jnp.arange(t)
    valid = pos < length
    if window is not None:
        valid &= pos >= length - window
    scores = jnp.where(valid, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    v = jnp.where(valid[None, :, None], v_cache.astype(jnp.float32), 0.0)
    out = jnp.einsum("kgt,ktd->kgd", probs, v, precision=hi)
    return out.reshape(n_heads, hd).astype(q.dtype)
