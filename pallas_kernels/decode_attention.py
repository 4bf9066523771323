"""Attention of one query token over a KV cache (flash-decoding).

The query comes as rows of a (rows, hd) array: its n_heads query heads, and for
`decode_attention_update` then the new token's n_kv key heads and n_kv value
heads, which is the fused q/k/v projection's output as it stands (a free
reshape), so the model slices, pads and rotates nothing outside the kernel.
k_cache, v_cache: (n_kv, T, hd), slot t holding position t. The `length` first
slots are valid (length = position + 1, a traced scalar); with a sliding
`window`, only the last `window` of them are.

The grid is (n_kv, n_splits): each program takes one kv head and one split of
the sequence. The query heads that share a kv head (GQA) are processed
together, loaded as a masked block of at least 16 rows so QK^T and PV are
tensor-core dots, so K and V are read once per kv head. With the update form
each program also applies the model's per-head RMS norm (qk-norm models) and
the rotary embedding at the token's position (its cos and sin made by the
caller's XLA, once a step) to its query rows and to the new key, in f32 in
registers; both act on the two halves of a head (rope's
rotate-half layout), so q, K and the new key are handled as halves throughout.
A program walks its split in blocks of `block_t` slots with an online softmax
in f32, and only over the blocks that hold valid slots: the loop bounds come
from `length`, so blocks past it are never read; splits with no valid slot
return at once. When one split holds every valid slot (short contexts) it
writes the output itself. Otherwise each active split writes its partial
(max, sum, output) and counts itself in its kv head's slot of
`split_counter`; the last of a head's splits to arrive merges them and writes
the output, so attention is one kernel, not a kernel plus a combine step (at
batch 1 a small model's step is bound by its kernel count). It loads the
partials several splits at a time (`merge_splits`): one by one, each load
waited on its own round trip to L2, and at context 4096 the merge of 16 splits
was a fifth of the kernel (KERNEL_NOTES.md, run 14). The counter must
be zero on entry and is left zero: callers thread one array through the
layers (`new_split_counter`), so no memset runs per call.

`decode_attention_reference` is attention over a cache in plain jnp; the
update form's query/key preparation is the model's own (yalm_jax.ops.rms_norm
and ops.rope), against which the tests check it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gemv import _pow2_divisor

# (block_t, split_t, num_warps, num_stages). Chosen on one H100 80GB HBM3 inside whole Mistral-7B decodes
# (KERNEL_NOTES.md): (64, 256) against (128, 512) in run 8, within 1% at context 128 and 3-5% faster at 1024 and
# 4096; 3 stages in run 14, so the walk has two blocks in flight (int4_a8 at 1024 2.245 -> 2.224 ms, at 4096 2.463
# -> 2.391).
DEFAULT_CONFIG = (64, 256, 4, 3)
# A split's slots by the longest step it serves, (bucket, split_t), the first bucket that holds the step's; longer
# steps take DEFAULT_CONFIG's. A program's walk is a chain of block steps and the last split to arrive merges the
# others, so shorter splits pay where a block step costs more than a merge. Timed kernel by kernel over splits of
# 1-8 blocks at contexts 128-4,096 on Mistral-7B's, SmolLM2's and Gemma 3's heads (8, 3 and 1 kv heads; an H100,
# KERNEL_NOTES.md run 31): 16-bit dots keep one split up to 256 slots (at 128, 1-block splits ran 1.13-1.25x
# slower), splits of 1 block up to 512 (1.02-1.12x faster than 2) and of 2 up to 2,048 (run 14: int4_a8 at 1024
# 2.303 -> 2.250 ms); f32 dots, three TF32 products a dot (attention_dot_precision), splits of 1 block up to
# 1,024 slots (1.14-2.03x faster than run 14's splits at 128-1,024, but level for Gemma 3 at 1,024) and of 2 up
# to 2,048.
SPLITS_16BIT = ((256, 256), (512, 64), (2048, 128))
SPLITS_F32 = ((1024, 64), (2048, 128))
MIN_GROUP = 16  # rows of a tensor-core dot
F32_TERMS = 3  # bf16 terms of an f32 query over a bf16 or fp8 cache: 3 x 8 bits of mantissa, f32's 24
# Shared memory one program may take on an H100 (the "available" of the card's refusals).
SMEM_LIMIT = 227 * 1024
# The merge loads up to MERGE_SPLITS splits' f32 partial outputs at once, at most MERGE_FLOATS of them (64 kB over
# 4 warps' registers): 8 of Mistral's (16, 128); against 4, int4_a8 at context 4096 2.497 -> 2.458 ms, level at
# 128 and 1024 (run 14).
MERGE_SPLITS = 8
MERGE_FLOATS = 8 * 16 * 128


def config_for(attn_len: int, dot_dtype) -> tuple[int, int, int, int]:
    """The tile for a decode step that reads at most `attn_len` slots (static: each decode bucket compiles its
    own step) with dots in `dot_dtype` (attention_operands): DEFAULT_CONFIG with the split of SPLITS_F32 or
    SPLITS_16BIT. The split is in DEFAULT_CONFIG's blocks' slots: blocks cut to fit shared memory cut it
    alike (decode_tile_that_fits)."""
    splits = SPLITS_F32 if jnp.dtype(dot_dtype) == jnp.float32 else SPLITS_16BIT
    split_t = next((split for bucket, split in splits if attn_len <= bucket), DEFAULT_CONFIG[1])
    block_t, _, num_warps, num_stages = DEFAULT_CONFIG
    return block_t, split_t, num_warps, num_stages


def tile_smem_bytes(
    rows: int, block_t: int, hd: int, num_stages: int, itemsize: int, precision=None, terms: int = 1
) -> int:  # fmt: skip
    """Shared memory Triton asks for an attention program whose dots take operands of `itemsize` bytes: the (rows,
    hd) query tile and num_stages buffers of the (block_t, hd) k and v tiles (an fp8 cache's counted at the dots'
    width: unmeasured, likely above). Dots as three TF32 products (attention_dot_precision) add the query's
    second TF32 part, and below 64 rows (too few for Hopper's wgmma, whose A operand stays in registers) the
    probabilities' two parts, (rows, block_t) each. Fitted to the refusals of decode and prefill tiles by an H100
    (one by an H200), every one matched to the byte (KERNEL_NOTES.md run 30). A query in `terms` terms
    (attention_operands) counts a query tile a term and, below 64 rows, a (rows, block_t) tile a term of the
    probabilities, by analogy: no refusal of that form was seen (the largest, Gemma 3's head of 256, compiled on an
    H100 at 227,328 bytes by this count; KERNEL_NOTES.md run 32)."""
    tile = (rows * terms + 2 * num_stages * block_t) * hd * itemsize
    if precision == lax.DotAlgorithmPreset.TF32_TF32_F32_X3:
        tile += rows * hd * 4 + (2 * rows * block_t * 4 if rows < 64 else 0)
    if terms > 1 and rows < 64:
        tile += terms * rows * block_t * itemsize
    return tile


def decode_tile_that_fits(
    block_t: int, num_stages: int, rows: int, hd: int, itemsize: int, precision=None, terms: int = 1
) -> tuple[int, int]:  # fmt: skip
    """(block_t, num_stages) cut until the tiles fit SMEM_LIMIT: the stages down to two first, then block_t halved
    (to MIN_GROUP). Gemma 3's f32 head of 256: blocks of 32 in two stages 24 us at context 128, of 16 in three 35
    (H100, KERNEL_NOTES.md run 30)."""
    def fits(bt, stages):
        return tile_smem_bytes(rows, bt, hd, stages, itemsize, precision, terms) <= SMEM_LIMIT

    while not fits(block_t, num_stages) and (num_stages > 2 or block_t > MIN_GROUP):
        if num_stages > 2:
            num_stages -= 1
        else:
            block_t //= 2
    return block_t, num_stages


def merge_splits(group_rows: int, hd: int) -> int:
    """How many splits' partials the merge loads at once, for query blocks of `group_rows` x `hd`."""
    return max(1, min(MERGE_SPLITS, MERGE_FLOATS // (group_rows * hd)))


def supported(t: int, hd: int) -> bool:
    """Shapes the kernel handles: a power-of-two head_dim >= 32 (two halves of >= 16), and T a multiple of 16."""
    return hd >= 32 and hd & (hd - 1) == 0 and t % 16 == 0


def _attention_kernel(
    len_ref, rows_ref, *refs, n_heads, group, bt, split_t, n_merge, window, scale, has_new, rope, norm_eps,
    dot_dtype, terms, interpret,
):  # fmt: skip
    refs = list(refs)
    rope_ref = refs.pop(0) if rope else None
    q_norm_ref, k_norm_ref = (refs.pop(0), refs.pop(0)) if norm_eps is not None else (None, None)
    k_ref, v_ref = refs[:2]
    # The refs between are the inputs aliased to the outputs (the counter, a poisoned output).
    o_ref, counter_ref, acc_ref, m_ref, l_ref = refs[-7:-2] if has_new else refs[-5:]
    k_out, v_out = refs[-2:] if has_new else (None, None)
    h, s = pl.program_id(0), pl.program_id(1)
    _, gp, hd = acc_ref.shape
    half = hd // 2
    f32 = jnp.float32
    in_dtype = rows_ref.dtype
    length = len_ref[0]
    # With a new token, the cache holds valid slots below length - 1 and the token itself is slot length - 1.
    cached = length - 1 if has_new else length

    # The splits that hold valid slots: from the window's start (or 0) to the one of slot length - 1. The others
    # do nothing, not even count themselves.
    first = 0 if window is None else lax.div(jnp.maximum(length - window, 0), split_t)
    last = lax.div(length - 1, split_t) + 1

    @pl.when((s >= first) & (s < last))
    def _():
        if rope:  # the token's rotation, for its queries and its key
            cos, sin = rope_ref[0], rope_ref[1]

        def prepare(x1, x2, norm_ref):
            """The halves (f32) of a query or key as the model uses them: RMS-normed per head, then rotated."""
            if norm_ref is not None:
                ss = jnp.sum(x1 * x1, axis=-1, keepdims=True) + jnp.sum(x2 * x2, axis=-1, keepdims=True)
                r = lax.rsqrt(ss / hd + norm_eps)
                x1 = ((x1 * r).astype(in_dtype) * norm_ref[pl.ds(0, half)]).astype(f32)
                x2 = ((x2 * r).astype(in_dtype) * norm_ref[pl.ds(half, half)]).astype(f32)
            if rope:
                x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            return x1, x2

        # This kv head's query rows; the block is padded to gp rows by the mask, never by a copy.
        is_query = lax.broadcasted_iota(jnp.int32, (gp, half), 0) < group
        q1, q2 = (
            plt.load(rows_ref.at[pl.ds(h * group, gp), pl.ds(c * half, half)], mask=is_query, other=0).astype(f32)
            for c in (0, 1)
        )
        q1, q2 = prepare(q1, q2, q_norm_ref)
        q1_terms, q2_terms = split_terms(q1, dot_dtype, terms), split_terms(q2, dot_dtype, terms)
        precision = attention_dot_precision(dot_dtype, interpret)

        lo = s * split_t
        hi = jnp.minimum(lo + split_t, cached)
        if window is not None:
            lo = jnp.maximum(lo, length - window)

        def body(b, carry):
            m, l, acc = carry
            t0 = pl.multiple_of(b * bt, bt)
            pos = t0 + lax.broadcasted_iota(jnp.int32, (bt,), 0)
            valid = pos < cached
            if window is not None:
                valid &= pos >= length - window
            k1 = k_ref[pl.ds(t0, bt), pl.ds(0, half)].astype(dot_dtype)
            k2 = k_ref[pl.ds(t0, bt), pl.ds(half, half)].astype(dot_dtype)
            scores = dot_terms(q1_terms, k1, precision, trans_b=True) + dot_terms(q2_terms, k2, precision, trans_b=True)
            scores = jnp.where(valid[None, :], scores * scale, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(scores, axis=1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(scores - m_new[:, None])
            l = alpha * l + jnp.sum(p, axis=1)
            v = v_ref[pl.ds(t0, bt), :].astype(dot_dtype)
            v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # unwritten slots may hold anything
            acc = alpha[:, None] * acc + dot_terms(split_terms(p, v.dtype, terms), v, precision)
            return m_new, l, acc

        init = (jnp.full((gp,), -jnp.inf, f32), jnp.zeros((gp,), f32), jnp.zeros((gp, hd), f32))
        m, l, acc = lax.fori_loop(lax.div(lo, bt), lax.div(hi + bt - 1, bt), body, init)
        if has_new:
            # The split holding slot length - 1 adds the new token and writes it into the cache.
            owner = s == last - 1
            k_row, v_row = n_heads + h, n_heads + n_heads // group + h
            kn1, kn2 = (rows_ref[pl.ds(k_row, 1), pl.ds(c * half, half)].astype(f32) for c in (0, 1))
            # The new key and value as the cache stores them (a narrower cache rounds them), as every
            # later step will read them.
            kn1, kn2 = (x.astype(k_out.dtype).astype(f32) for x in prepare(kn1, kn2, k_norm_ref))
            vn = rows_ref[pl.ds(v_row, 1), :].astype(v_out.dtype)
            s_new = jnp.sum(q1 * kn1 + q2 * kn2, axis=1) * scale
            m2 = jnp.maximum(m, s_new)
            alpha = jnp.exp(m - m2)
            p_new = jnp.exp(s_new - m2)
            m = jnp.where(owner, m2, m)
            l = jnp.where(owner, alpha * l + p_new, l)
            acc = jnp.where(owner, alpha[:, None] * acc + p_new[:, None] * vn.astype(f32), acc)

            @pl.when(owner)
            def _():
                k_out[pl.ds(length - 1, 1), pl.ds(0, half)] = kn1.astype(k_out.dtype)
                k_out[pl.ds(length - 1, 1), pl.ds(half, half)] = kn2.astype(k_out.dtype)
                v_out[pl.ds(length - 1, 1), :] = vn

        def write_output(o_sum, l_sum):
            is_head = lax.broadcasted_iota(jnp.int32, (gp, hd), 0) < group
            plt.store(o_ref.at[pl.ds(h * group, gp), :], (o_sum / l_sum[:, None]).astype(o_ref.dtype), mask=is_head)

        # At short contexts one split holds every valid slot: it writes the output itself.
        pl.when(last - first == 1)(lambda: write_output(acc, l))

        @pl.when(last - first > 1)
        def _():
            acc_ref[s] = acc
            m_ref[s] = m
            l_ref[s] = l
            if not interpret:  # all threads' partials are stored before the count says so (the interpreter runs
                plt.debug_barrier()  # programs one at a time, and has no barrier)
            # acq_rel at GPU scope: the partials of the programs counted before are visible to the one that
            # sees the count.
            arrived = plt.atomic_add(counter_ref, h, jnp.int32(1))

            @pl.when(arrived == last - first - 1)
            def _():
                counter_ref[h] = jnp.int32(0)  # every active split of this head has counted: none reads it again

                def merge(c, carry):
                    # n_merge splits a round, one masked load each of their partials (written by other SMs:
                    # volatile, never this SM's L1), rescaling as the running max grows (as within a split).
                    # Every active split holds a valid slot: its m is finite, and exp(-inf) = 0 drops the empty
                    # initial state and the masked rows past the last split.
                    o_sum, l_sum, m_run = carry
                    i = first + c * n_merge
                    active = i + lax.broadcasted_iota(jnp.int32, (n_merge,), 0) < last

                    def partials(ref, other):
                        shape = (n_merge, *ref.shape[1:])
                        mask = jnp.broadcast_to(active.reshape((n_merge,) + (1,) * (len(shape) - 1)), shape)
                        return plt.load(ref.at[pl.ds(i, n_merge)], mask=mask, other=other, volatile=True)

                    m_i = partials(m_ref, -jnp.inf)  # (n_merge, gp)
                    m_new = jnp.maximum(m_run, jnp.max(m_i, axis=0))
                    a, b = jnp.exp(m_run - m_new), jnp.exp(m_i - m_new[None])
                    o_sum = a[:, None] * o_sum + jnp.sum(b[:, :, None] * partials(acc_ref, 0.0), axis=0)
                    return o_sum, a * l_sum + jnp.sum(b * partials(l_ref, 0.0), axis=0), m_new

                init = (jnp.zeros((gp, hd), f32), jnp.zeros((gp,), f32), jnp.full((gp,), -jnp.inf, f32))
                rounds = lax.div(last - first + n_merge - 1, n_merge)
                o_sum, l_sum, _ = lax.fori_loop(0, rounds, merge, init)
                write_output(o_sum, l_sum)


def attention_operands(q_dtype, cache_dtype) -> tuple[jnp.dtype, int]:
    """(dtype, terms): the dtype q and the cache blocks meet in for QK^T and PV (accumulating in f32), and the
    terms of it an f32 query and its probabilities are split into (split_terms). An f32 query over a bf16 or fp8
    cache: bf16 (fp8 blocks upcast exactly as loaded) in F32_TERMS terms, whose sum is the f32 value, so the
    products cost bf16's and not three TF32 ones'. Otherwise whole, in the wider of the two (with an fp8 cache
    q's)."""
    q, c = jnp.dtype(q_dtype), jnp.dtype(cache_dtype)
    if q == jnp.float32 and (c == jnp.bfloat16 or c.itemsize == 1):
        return jnp.dtype(jnp.bfloat16), F32_TERMS
    return (q if c.itemsize == 1 else jnp.dtype(jnp.promote_types(q, c))), 1


def split_terms(x: jax.Array, dtype, terms: int) -> list[jax.Array]:
    """x as `terms` values of `dtype` that sum to it: each the rounding of what the ones before leave."""
    out = []
    for _ in range(terms):
        out.append(x.astype(dtype))
        x = x - out[-1].astype(x.dtype)
    return out


def dot_terms(terms: list[jax.Array], b: jax.Array, precision, trans_b: bool = False) -> jax.Array:
    """The sum of each term's product with b, in f32, the smaller terms' first."""
    return functools.reduce(jnp.add, [plt.dot(a, b, trans_b=trans_b, precision=precision) for a in terms[::-1]])


def attention_dot_precision(dot_dtype, interpret: bool):
    """How the attention kernels' dots multiply: 16-bit operands on the tensor cores as they are; f32 ones as
    three TF32 products, errors as small as an f32 FMA dot's (an H100: decode 1.2-1.6x and a 512-token prefill
    ~30x faster; KERNEL_NOTES.md run 29), or in the interpreter, where XLA CPU has no TF32 algorithm, exactly."""
    if jnp.dtype(dot_dtype) != jnp.float32:
        return None
    return lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def new_split_counter(n_kv: int) -> jax.Array:
    """The zeroed counter the kernel merges its splits with, one slot a kv head; every call leaves it zero."""
    return jnp.zeros((n_kv,), jnp.int32)


def _decode_attention_call(
    rows, k_cache, v_cache, length, split_counter, *, n_heads, has_new, rope_inv_freq=None, qk_norm=None,
    window=None, scale=None, attn_len=None, config=None, out=None, interpret=False,
):  # fmt: skip
    """(out (n_heads, hd) in rows' dtype, split_counter), then with `has_new` the two updated caches.

    rows: (n_heads, hd) queries, or with `has_new` (n_heads + 2 n_kv, hd): the
    queries, the new token's keys, then its values. Scores are q.k * scale
    (default head_dim ** -0.5), over slots < length (and >= length - window);
    length >= 1. `out`, if given, is a buffer of the output's shape aliased to
    it (tests poison it).

    With `has_new`, the token at position length - 1 is not in the cache yet:
    the kernel attends over slots < length - 1 plus the new token and writes
    the token into slot length - 1 of the caches (aliased, in place).
    `qk_norm` = (q_weight, k_weight, eps) RMS-norms each query and key head
    first; `rope_inv_freq` (hd/2,) then rotates them at position length - 1
    (rotate-half layout). `config` defaults to config_for(attn_len, the dots'
    dtype), where `attn_len` (static, default the cache's slots) bounds the length.
    """
    n_kv, t, hd = k_cache.shape
    group = n_heads // n_kv
    gp = max(MIN_GROUP, pl.next_power_of_2(group))
    dot_dtype, terms = attention_operands(rows.dtype, k_cache.dtype)
    block_t, split_t, num_warps, num_stages = config or config_for(attn_len or t, dot_dtype)
    precision = attention_dot_precision(dot_dtype, interpret)
    bt, num_stages = decode_tile_that_fits(block_t, num_stages, gp, hd, dot_dtype.itemsize, precision, terms)
    # A split keeps its blocks where they shrink to fit: a program's walk is a chain of block_t-slot steps, and
    # Gemma 3's f32 head (blocks of 32) ran 1.36-1.48x faster at contexts 512 to 4096 with half the split (run 30).
    split_t = split_t * bt // block_t
    bt = _pow2_divisor(t, bt)
    split_t = max(bt, min(split_t, t) // bt * bt)
    n_splits = pl.cdiv(t, split_t)
    length = jnp.asarray(length, jnp.int32).reshape(1)

    def whole(a):
        return pl.BlockSpec(a.shape, lambda h, s: (0,) * len(a.shape))

    # The output and the counter are shared by all programs; each kv head's partials by its splits.
    # The merge reads n_merge splits' partials at a time from any split on: rows past the last are never written,
    # only masked, but they exist, so no read runs off the array (the interpreter would clamp it).
    n_merge = merge_splits(gp, hd)
    slots = n_splits + n_merge - 1
    out_shape = (
        jax.ShapeDtypeStruct((n_heads, hd), rows.dtype),
        jax.ShapeDtypeStruct((n_kv,), jnp.int32),
        jax.ShapeDtypeStruct((n_kv, slots, gp, hd), jnp.float32),
        jax.ShapeDtypeStruct((n_kv, slots, gp), jnp.float32),
        jax.ShapeDtypeStruct((n_kv, slots, gp), jnp.float32),
    )
    out_specs = (
        whole(out_shape[0]),
        whole(out_shape[1]),
        pl.BlockSpec((None, slots, gp, hd), lambda h, s: (h, 0, 0, 0)),
        pl.BlockSpec((None, slots, gp), lambda h, s: (h, 0, 0)),
        pl.BlockSpec((None, slots, gp), lambda h, s: (h, 0, 0)),
    )
    kv_spec = pl.BlockSpec((None, t, hd), lambda h, s: (h, 0, 0))
    operands = [length, rows]
    if rope_inv_freq is not None:
        # cos and sin of the token's angles, made here rather than by every program: XLA computes them once a
        # step for all layers (the same position, the same frequencies), and sin and cos in the kernel sat at
        # the head of each program's chain: 7.6 -> 6.2 us a call, int4 Mistral-7B decode -1.9% (KERNEL_NOTES.md,
        # run 9).
        angle = (length[0] - 1).astype(jnp.float32) * jnp.asarray(rope_inv_freq, jnp.float32)
        operands.append(jnp.stack([jnp.cos(angle), jnp.sin(angle)]))
    if qk_norm is not None:
        operands += [w.astype(rows.dtype) for w in qk_norm[:2]]
    in_specs = [whole(a) for a in operands]
    cache_at = len(operands)
    operands += [k_cache, v_cache, split_counter]
    in_specs += [kv_spec, kv_spec, out_specs[1]]
    aliases = {cache_at + 2: 1}
    if out is not None:
        aliases[len(operands)] = 0
        operands.append(out)
        in_specs.append(out_specs[0])
    if has_new:
        aliases |= {cache_at: 5, cache_at + 1: 6}
        out_shape += (
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
        )
        out_specs += (kv_spec, kv_spec)

    kernel = functools.partial(
        _attention_kernel, n_heads=n_heads, group=group, bt=bt, split_t=split_t, n_merge=n_merge, window=window,
        scale=hd**-0.5 if scale is None else scale, has_new=has_new, rope=rope_inv_freq is not None,
        norm_eps=None if qk_norm is None else float(qk_norm[2]), dot_dtype=dot_dtype, terms=terms,
        interpret=interpret,
    )  # fmt: skip
    o, split_counter, _, _, _, *caches = pl.pallas_call(
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
    return o, split_counter, *caches


def decode_attention(
    q, k_cache, v_cache, length, *, window=None, scale=None, config=None, out=None, interpret=False
):  # fmt: skip
    """softmax(q K^T * scale) V over the valid slots (scale default 1 / sqrt(hd)); (n_heads, hd) in q's dtype."""
    o, _ = _decode_attention_call(
        q, k_cache, v_cache, length, new_split_counter(k_cache.shape[0]), n_heads=q.shape[0], has_new=False,
        window=window, scale=scale, config=config, out=out, interpret=interpret,
    )  # fmt: skip
    return o


def decode_attention_update(
    qkv, k_cache, v_cache, pos, split_counter=None, *, n_heads, rope_inv_freq=None, qk_norm=None, window=None,
    scale=None, attn_len=None, config=None, interpret=False,
):  # fmt: skip
    """Attention of the token at position `pos` over the cache, which it also enters.

    qkv: (n_heads + 2 n_kv, hd), the token's query heads, key heads and value
    heads, queries and keys before `qk_norm` and rope (see
    `_decode_attention_call`). Reads slots < pos of the caches and the new
    key/value, and writes them (the key normed and rotated) into slot pos in the
    same kernel (the caches are updated in place when donated). `split_counter`
    (`new_split_counter`, made here if not given) comes back zeroed for the next call.
    Returns (out (n_heads, hd), k_cache, v_cache, split_counter).
    """
    if split_counter is None:
        split_counter = new_split_counter(k_cache.shape[0])
    out, split_counter, k_cache, v_cache = _decode_attention_call(
        qkv, k_cache, v_cache, pos + 1, split_counter, n_heads=n_heads, has_new=True, rope_inv_freq=rope_inv_freq,
        qk_norm=qk_norm, window=window, scale=scale, attn_len=attn_len, config=config, interpret=interpret,
    )  # fmt: skip
    return out, k_cache, v_cache, split_counter


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
