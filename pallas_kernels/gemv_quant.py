"""Batch-1 y = W x for a quantized W (yalm_jax.quant.QuantizedMatrix), dequantized in the kernel.

The same design as `gemv.py` (whose configs, fused norm, gate, bias and
residual it shares): each program owns `block_n` rows and walks the quantized
row in chunks of `block_k` stored bytes, so the bytes read per token are the
quantized ones. Values turn into f32 in registers; scales (and int4 mins) are
applied once per group, after the group's products are summed:

  y_n = sum_g scale[n, g] * sum_{j in g} v[n, j] x[j]  (+ min[n, g] * sum_{j in g} x[j])

with v = q (int8, fp8) or q - 8 (int4 without a min). The kernel sees every
operand as groups, through free reshapes outside it: q as (N, K/G, bytes of a group), x as (K/G, G), and for int4,
whose byte j of a group holds column j in its low nibble and column j + G/2 in
its high one, x as (K/G, 2, G/2), so each chunk of bytes meets the two matching
runs of x straight from memory. A chunk is a (block_n, groups, bytes) tile whose
innermost axis is one group's bytes, so the sum per group needs no reshuffle.
Per-channel formats (one scale a row) take the chunk itself as the group, keep
a (block_n, 1, block_k) accumulator and scale once at the end.

With an Int8Activation x (yalm_jax.quant: x rounded to int8 in blocks of 32,
for int8 and int4:32 weights), `_kernel_a8` multiplies integers instead: the
weights as int32 words against x's words through PTX's dp4a (four products an
instruction; int4 unpacked into two words of nibbles), each block's integer sum
scaled once by x's and the weights' scales.

`gemv_quant_reference` is the function in plain jnp (dequantize, then
`gemv.gemv_reference`). Lowered through Pallas' Triton backend on the GPU;
`interpret=True` runs it anywhere (the PTX instructions as jnp).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gemv import _load_w, _pow2_divisor, append_epilogue, gemv_reference, kernel_name, write_epilogue
from yalm_jax.quant import ACT_BLOCK, Int8Activation, dequantize_activation

# (block_n, block_k in stored bytes, num_warps, num_stages), per (bits a weight, n_out, k, gated): int8 and
# fp8 share the 8-bit entries. Mistral-7B's shapes, from scripts/gpu_check.py (sweep:int8, sweep:int4) on
# one H100 80GB HBM3, 2026-11-25 (the int4 wo, w2 and output rows re-chosen by the GPU's own kernel
# times, run 5); other shapes take DEFAULT_CONFIG.
DEFAULT_CONFIG = (4, 2048, 8, 2)
CONFIGS: dict[tuple[int, int, int, bool], tuple[int, int, int, int]] = {
    (8, 6144, 4096, False): (2, 4096, 4, 2),  # wqkv
    (8, 4096, 4096, False): (4, 4096, 8, 2),  # wo
    (8, 14336, 4096, True): (2, 4096, 4, 2),  # w13, gated
    (8, 4096, 14336, False): (2, 4096, 4, 2),  # w2
    (8, 32000, 4096, False): (4, 4096, 8, 2),  # output
    (4, 6144, 4096, False): (8, 2048, 8, 2),
    (4, 4096, 4096, False): (4, 2048, 4, 2),
    (4, 14336, 4096, True): (8, 2048, 8, 2),
    (4, 4096, 14336, False): (4, 2048, 4, 2),
    (4, 32000, 4096, False): (4, 2048, 4, 2),
}


def _values(q, fmt: str, symmetric: bool) -> list:
    """The f32 values (before the scale) of a tile of stored bytes: [q] (int8, fp8), or int4's
    [low nibbles, high nibbles], less 8 when symmetric."""
    f32 = jnp.float32
    if fmt != "int4":
        return [q.astype(f32)]
    return [(n & 15).astype(f32) - (8.0 if symmetric else 0.0) for n in (q, q >> 4)]


def _groups(ref, g0, ng: int, int4: bool) -> list:
    """Groups g0 .. g0 + ng of a vector viewed as groups: [(ng, G)], or int4's two halves [(ng, G/2)] * 2."""
    if int4:
        return [ref[pl.ds(g0, ng), h, :] for h in (0, 1)]
    return [ref[pl.ds(g0, ng), :]]


def _ptx(instruction: str, dtype, *args):
    """One PTX instruction applied elementwise to `args` (32-bit registers, broadcast to one shape)."""
    shape = jnp.broadcast_shapes(*(a.shape for a in args))
    operands = ", ".join(f"${i}" for i in range(len(args) + 1))
    out = jax.ShapeDtypeStruct(shape, dtype)
    return plt.elementwise_inline_asm(
        f"{instruction} {operands};", args=[jnp.broadcast_to(a, shape) for a in args],
        constraints=",".join(["=r"] + ["r"] * len(args)), pack=1, result_shape_dtypes=[out],
    )[0]  # fmt: skip


def _fma_ptx(a, b, c):
    """a * b + c in one rounding, as PTX's fma: the Triton lowering emits separate multiplies and adds for
    `a * b + c` (Nsight Compute counted no fused instruction), and fusing them took the kernels 1-8% faster
    on an H200 (KERNEL_NOTES.md, run 7). Interpret mode, which runs no PTX, computes a * b + c."""
    return _ptx("fma.rn.f32", jnp.float32, a, b, c)


def _kernel(*refs, k, bn, ng, fmt, symmetric, per_channel, gated, activation, has_norm, has_min, has_bias,
            has_res, eps, interpret):  # fmt: skip
    refs = list(refs)
    x_ref = refs.pop(0)
    g_ref = refs.pop(0) if has_norm else None
    n_w = 2 if gated else 1
    q_refs = [refs.pop(0) for _ in range(n_w)]
    s_refs = [refs.pop(0) for _ in range(n_w)]
    m_refs = [refs.pop(0) for _ in range(n_w)] if has_min else None
    f32 = jnp.float32
    int4 = fmt == "int4"
    n_chunks = x_ref.shape[0] // ng
    fma = (lambda a, b, c: a * b + c) if interpret else _fma_ptx

    def x_chunk(i):
        return _groups(x_ref, pl.multiple_of(i * ng, ng), ng, int4)

    norm_scale = None
    if has_norm:

        def sum_sq(i, acc):
            return acc + sum(jnp.sum(jnp.square(xb.astype(f32)), axis=1) for xb in x_chunk(i))

        norm_scale = lax.rsqrt(jnp.sum(lax.fori_loop(0, n_chunks, sum_sq, jnp.zeros((ng,), f32))) / k + eps)

    def body(i, accs):
        g0 = pl.multiple_of(i * ng, ng)
        xs = x_chunk(i)
        if has_norm:
            # Same roundings as ops.rms_norm: normalise in f32, round, scale by g in x's dtype.
            gs = _groups(g_ref, g0, ng, int4)
            xs = [(xb.astype(f32) * norm_scale).astype(xb.dtype) * g for xb, g in zip(xs, gs)]
        xs = [xb.astype(f32)[None] for xb in xs]
        new = []
        for acc, w in zip(accs, range(n_w)):
            q = _load_w(q_refs[w].at[:, pl.ds(g0, ng), :])  # (bn, ng, bytes of a group)
            vals = _values(q, fmt, symmetric)
            if per_channel:
                new.append(fma(vals[0], xs[0], acc))
                continue
            prod = vals[0] * xs[0] if len(vals) == 1 else fma(vals[1], xs[1], vals[0] * xs[0])
            part = jnp.sum(prod, axis=2) * s_refs[w][:, pl.ds(g0, ng)].astype(f32)
            if has_min:
                xsum = sum(jnp.sum(xb[0], axis=1) for xb in xs)[None, :]  # (1, ng): each group's x sum
                part = part + m_refs[w][:, pl.ds(g0, ng)].astype(f32) * xsum
            new.append(acc + part)
        return tuple(new)

    shape = (bn, 1, x_ref.shape[-1]) if per_channel else (bn, ng)
    accs = lax.fori_loop(0, n_chunks, body, tuple(jnp.zeros(shape, f32) for _ in q_refs))
    ys = [jnp.sum(a.reshape(bn, -1), axis=1) for a in accs]
    if per_channel:
        ys = [y * s[...].astype(f32)[:, 0] for y, s in zip(ys, s_refs)]
    write_epilogue(refs, ys, gated, activation, has_bias, has_res)


def _dp4a_ptx(a, b, c, signed_a: bool):
    """c + the dot product of a's and b's four bytes (b signed; a signed or not), a word at a time: PTX's dp4a,
    four products an instruction."""
    return _ptx(f"dp4a.{'s32' if signed_a else 'u32'}.s32", jnp.int32, a, b, c)


def _dp4a_jnp(a, b, c, signed_a: bool):
    """_dp4a_ptx in integer jnp, for interpret mode."""

    def byte(w, i, signed):
        return (w << (24 - 8 * i)) >> 24 if signed else (w >> (8 * i)) & 0xFF

    return c + sum(byte(a, i, signed_a) * byte(b, i, True) for i in range(4))


def _kernel_a8(*refs, bn, ng, int4, symmetric, per_channel, gated, activation, has_min, has_bias, has_res,
               interpret):  # fmt: skip
    """The products of int8 / int4 weights with an Int8Activation: integer dot products per block of
    ACT_BLOCK, then one f32 scale of the block (and of the weights' group) per block sum."""
    refs = list(refs)
    xw_ref, xd_ref, xq_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    n_w = 2 if gated else 1
    q_refs = [refs.pop(0) for _ in range(n_w)]
    s_refs = [refs.pop(0) for _ in range(n_w)]
    m_refs = [refs.pop(0) for _ in range(n_w)] if has_min else None
    f32 = jnp.float32
    dp4a = _dp4a_jnp if interpret else _dp4a_ptx

    def body(i, accs):
        g0 = pl.multiple_of(i * ng, ng)
        xw = _groups(xw_ref, g0, ng, int4)  # int4: the words of each block's first and second halves
        d, qsum = xd_ref[pl.ds(g0, ng)][None], xq_ref[pl.ds(g0, ng)][None]  # (1, ng)
        new = []
        for acc, w in zip(accs, range(n_w)):
            q = _load_w(q_refs[w].at[:, pl.ds(g0, ng), :])  # (bn, ng, words of a block)
            # int4's low nibbles are a block's first half, its high nibbles the second (quant.pack_int4).
            pairs = [(q & 0x0F0F0F0F, xw[0]), ((q >> 4) & 0x0F0F0F0F, xw[1])] if int4 else [(q, xw[0])]
            dot = jnp.zeros(q.shape, jnp.int32)
            for a, b in pairs:
                dot = dp4a(a, b[None], dot, signed_a=not int4)
            v = jnp.sum(dot, axis=2).astype(f32)  # (bn, ng), exact
            if symmetric:
                v = v - 8 * qsum
            v = v * d if per_channel else v * d * s_refs[w][:, pl.ds(g0, ng)].astype(f32)
            if has_min:
                v = v + m_refs[w][:, pl.ds(g0, ng)].astype(f32) * (d * qsum)
            new.append(acc + v)
        return tuple(new)

    accs = lax.fori_loop(0, xd_ref.shape[0] // ng, body, tuple(jnp.zeros((bn, ng), f32) for _ in q_refs))
    ys = [jnp.sum(a, axis=1) for a in accs]
    if per_channel:
        ys = [y * s[...].astype(f32)[:, 0] for y, s in zip(ys, s_refs)]
    write_epilogue(refs, ys, gated, activation, has_bias, has_res)


def gemv_quant(
    w,
    x: jax.Array,
    *,
    bias: jax.Array | None = None,
    residual: jax.Array | None = None,
    norm: tuple[jax.Array, float] | None = None,
    gated: bool = False,
    activation: str = "silu",
    config: tuple[int, int, int, int] | None = None,
    out: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`gemv.gemv` for a QuantizedMatrix w (N, K): y = W x (+ bias) (+ residual) in x's dtype, f32 accumulation.

    `config` = (block_n, block_k, num_warps, num_stages), block_k counting stored
    bytes of a row; blocks shrink to powers of two that divide the row count and
    the stored row length, and a chunk holds whole groups. `out` is an optional
    buffer aliased to the result.
    """
    n, k = w.shape
    if x.shape != (k,):
        raise ValueError(f"x has shape {x.shape}, expected ({k},)")
    if gated and n % 2:
        raise ValueError(f"gated gemv needs an even row count, got {n}")
    int4 = w.fmt == "int4"
    per_channel = w.group == k and not int4
    act8 = isinstance(x, Int8Activation)
    if act8 and (not w.int8_activations or norm is not None):
        raise ValueError(f"an int8 activation multiplies a matrix quant.with_int8_activations marked (int8, or "
                         f"int4 in groups of {ACT_BLOCK}), normalised before it is rounded; got {w.fmt} group "
                         f"{w.group}, int8_activations={w.int8_activations}")  # fmt: skip
    n_out = n // 2 if gated else n
    bn, bk, num_warps, num_stages = config or CONFIGS.get((4 if int4 else 8, n_out, k, gated), DEFAULT_CONFIG)
    bn = _pow2_divisor(n_out, bn)
    row_bytes = w.q.shape[1] * jnp.dtype(w.q.dtype).itemsize
    bk = _pow2_divisor(row_bytes, bk)
    # The kernel's view: groups of G columns (per channel: chunks of bk columns; with an int8 activation, its
    # blocks) and their stored bytes (with an int8 activation, as int32 words).
    group = ACT_BLOCK if act8 else bk if per_channel else w.group
    stored = group // 2 if int4 else group
    ng = 1 if per_channel and not act8 else max(1, bk // stored)

    def as_groups(v):  # a (K,) vector, or K / 4 words, in the kernel's view of x
        g = group // 4 if act8 else group
        return v.reshape(-1, 2, g // 2) if int4 else v.reshape(-1, g)

    if act8:  # the int32 words with_int8_activations stored
        q = w.q.reshape(n, k // group, stored // 4)
        xs = [as_groups(x.words), x.scale, x.qsum]
    else:
        q = w.q_bytes().reshape(n, k // group, stored)
        xs = [as_groups(x)] + ([as_groups(norm[0].astype(x.dtype))] if norm is not None else [])
    vec_n = pl.BlockSpec((bn,), lambda i: (i,))
    operands, specs = xs, [pl.BlockSpec(v.shape, lambda i, nd=v.ndim: (0,) * nd) for v in xs]
    h = n_out // bn
    for arr in (q, w.scale) + ((w.min,) if w.min is not None else ()):
        block = (bn, *arr.shape[1:])
        zeros = (0,) * (arr.ndim - 1)
        # The row block of `arr`, and for the gate's partner the up rows h blocks below.
        specs.append(pl.BlockSpec(block, lambda i, z=zeros: (i, *z)))
        operands.append(arr)
        if gated:
            specs.append(pl.BlockSpec(block, lambda i, z=zeros: (i + h, *z)))
            operands.append(arr)
    aliases = append_epilogue(operands, specs, vec_n, bias, residual, out)

    common = dict(bn=bn, ng=ng, symmetric=int4 and w.min is None, per_channel=per_channel, gated=gated,
                  activation=activation, has_min=w.min is not None, has_bias=bias is not None,
                  has_res=residual is not None, interpret=interpret)  # fmt: skip
    if act8:
        kernel = functools.partial(_kernel_a8, int4=int4, **common)
    else:
        kernel = functools.partial(_kernel, k=k, fmt=w.fmt, has_norm=norm is not None,
                                   eps=float(norm[1]) if norm is not None else 0.0, **common)  # fmt: skip
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_out,), x.dtype),
        grid=(h,),
        in_specs=specs,
        out_specs=vec_n,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=kernel_name(f"gemv_{w.fmt}{'_a8' if act8 else ''}", n_out, k, gated, (bn, bk, num_warps)),
    )(*operands)


def gemv_quant_reference(w, x, **kw) -> jax.Array:
    """The function `gemv_quant` computes, in plain jnp: dequantize to f32 (an Int8Activation x too), then
    `gemv_reference`."""
    if isinstance(x, Int8Activation):
        return gemv_reference(w.dequantize(jnp.float32), dequantize_activation(x), **kw).astype(x.dtype)
    return gemv_reference(w.dequantize(jnp.float32), x, **kw)
