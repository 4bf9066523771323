"""Batch-1 y = W x for a quantized W (yalm_jax.quant.QuantizedMatrix), dequantized in the kernel.

The same design as `gemv.py` (whose configs, fused norm, bias, residual and
gate it shares): each program owns `block_n` rows and walks the quantized row
in chunks of `block_k` stored columns (bytes: int8, fp8, or two int4 values),
so the bytes read per token are the quantized ones. Values turn into f32 in
registers; scales (and int4 mins) are applied once per group, after the
group's products are summed:

  y_n = sum_g scale[n, g] * sum_{j in g} v[n, j] x[j]  (+ min[n, g] * sum_{j in g} x[j])

with v = q (int8, fp8) or q - 8 (int4 without a min). Per-channel formats
(group = K) keep a (block_n, block_k) accumulator and scale once at the end.
int4 bytes hold column j of a group in the low nibble and column j + group/2
in the high one, so x is split the same way outside the kernel (x_lo, x_hi:
K/2 each, a tiny XLA op) and each chunk of bytes meets two contiguous runs of x.

`gemv_quant_reference` is the function in plain jnp (dequantize, then
`gemv.gemv_reference`). Lowered through Pallas' Triton backend on the GPU;
`interpret=True` runs it anywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.gemv import CONFIGS, DEFAULT_CONFIG, _load_w, _pow2_divisor, append_epilogue, gemv_reference


def _rms_scale(x_refs, k: int, bk: int, eps: float):
    """rsqrt(mean(x^2) + eps) over all parts of x (int4's two halves), in f32."""

    def body(i, acc):
        for r in x_refs:
            xb = r[pl.ds(pl.multiple_of(i * bk, bk), bk)].astype(jnp.float32)
            acc = acc + xb * xb
        return acc

    acc = lax.fori_loop(0, x_refs[0].shape[0] // bk, body, jnp.zeros((bk,), jnp.float32))
    return lax.rsqrt(jnp.sum(acc) / k + eps)


def _kernel(*refs, k, bn, bk, gq, int4, symmetric, per_channel, gated, has_norm, has_min, has_bias, has_res, eps):
    refs = list(refs)
    n_parts = 2 if int4 else 1
    x_refs = [refs.pop(0) for _ in range(n_parts)]
    g_refs = [refs.pop(0) for _ in range(n_parts)] if has_norm else None
    n_w = 2 if gated else 1
    q_refs = [refs.pop(0) for _ in range(n_w)]
    s_refs = [refs.pop(0) for _ in range(n_w)]
    m_refs = [refs.pop(0) for _ in range(n_w)] if has_min else None
    b_ref = refs.pop(0) if has_bias else None
    r_ref = refs.pop(0) if has_res else None
    if len(refs) == 2:  # a poison buffer aliased to the output (tests)
        refs.pop(0)
    (o_ref,) = refs
    x_dtype = x_refs[0].dtype
    f32 = jnp.float32
    ng = bk // gq  # groups per chunk (grouped formats)
    norm_scale = _rms_scale(x_refs, k, bk, eps) if has_norm else None

    def values(q):
        """The chunk's stored columns as f32 values, one array per part of x."""
        if not int4:
            return [q.astype(f32)]
        vs = [(q & 15).astype(f32), (q >> 4).astype(f32)]
        return [v - 8.0 for v in vs] if symmetric else vs

    def body(i, accs):
        k0 = pl.multiple_of(i * bk, bk)
        xs = []
        for j, r in enumerate(x_refs):
            xb = r[pl.ds(k0, bk)]
            if has_norm:
                xb = (xb.astype(f32) * norm_scale).astype(x_dtype) * g_refs[j][pl.ds(k0, bk)]
            xs.append(xb.astype(f32))
        new = []
        for acc, w in zip(accs, range(n_w)):
            prod = sum(v * xb[None, :] for v, xb in zip(values(_load_w(q_refs[w].at[:, pl.ds(k0, bk)])), xs))
            if per_channel:
                new.append(acc + prod)
                continue
            g0 = pl.multiple_of(i * ng, ng)
            part = jnp.sum(prod.reshape(bn, ng, gq), axis=2) * s_refs[w][:, pl.ds(g0, ng)].astype(f32)
            if has_min:
                xsum = jnp.sum(sum(xs).reshape(ng, gq), axis=1)
                part = part + m_refs[w][:, pl.ds(g0, ng)].astype(f32) * xsum[None, :]
            new.append(acc + part)
        return tuple(new)

    width = bk if per_channel else ng
    accs = lax.fori_loop(0, q_refs[0].shape[1] // bk, body, tuple(jnp.zeros((bn, width), f32) for _ in q_refs))
    ys = [jnp.sum(a, axis=1) for a in accs]
    if per_channel:
        ys = [y * s[...].astype(f32)[:, 0] for y, s in zip(ys, s_refs)]
    if gated:
        gate, up = ys
        y = gate / (1.0 + jnp.exp(-gate)) * up
    else:
        (y,) = ys
    if has_bias:
        y = y + b_ref[...].astype(f32)
    if has_res:
        y = y + r_ref[...].astype(f32)
    o_ref[...] = y.astype(o_ref.dtype)


def _split_halves(v: jax.Array, group: int) -> list[jax.Array]:
    """v (K,) in the int4 byte order: [columns j of each group's first half], [the second halves]."""
    vg = v.reshape(-1, 2, group // 2)
    return [vg[:, 0].reshape(-1), vg[:, 1].reshape(-1)]


def gemv_quant(
    w,
    x: jax.Array,
    *,
    bias: jax.Array | None = None,
    residual: jax.Array | None = None,
    norm: tuple[jax.Array, float] | None = None,
    gated: bool = False,
    config: tuple[int, int, int, int] | None = None,
    out: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`gemv.gemv` for a QuantizedMatrix w (N, K): y = W x (+ bias) (+ residual) in x's dtype, f32 accumulation.

    `config` = (block_n, block_k, num_warps, num_stages), block_k counting stored
    columns (bytes); blocks shrink to powers of two that divide the row count
    and the stored row length. `out` is an optional buffer aliased to the result.
    """
    n, k = w.shape
    if x.shape != (k,):
        raise ValueError(f"x has shape {x.shape}, expected ({k},)")
    if gated and n % 2:
        raise ValueError(f"gated gemv needs an even row count, got {n}")
    int4 = w.fmt == "int4"
    per_channel = w.group == k and not int4
    gq = w.group // 2 if int4 else w.group  # stored columns per group
    n_out = n // 2 if gated else n
    bn, bk, num_warps, num_stages = config or CONFIGS.get((n_out, k, gated), DEFAULT_CONFIG)
    bn = _pow2_divisor(n_out, bn)
    bk = _pow2_divisor(w.q.shape[1], bk)
    if not per_channel:
        bk = max(bk, gq)  # whole groups per chunk (gq, a power of two, divides the row)
    h = n_out // bn

    x_parts = _split_halves(x, w.group) if int4 else [x]
    vec_x = pl.BlockSpec((x_parts[0].shape[0],), lambda i: (0,))
    vec_n = pl.BlockSpec((bn,), lambda i: (i,))
    operands, specs = list(x_parts), [vec_x] * len(x_parts)
    if norm is not None:
        g = norm[0].astype(x.dtype)
        operands += _split_halves(g, w.group) if int4 else [g]
        specs += [vec_x] * len(x_parts)

    def rows(arr):  # the row block of `arr`, and for the gate's partner the up rows h blocks below
        full = arr.shape[1]
        return [pl.BlockSpec((bn, full), lambda i: (i, 0))] + (
            [pl.BlockSpec((bn, full), lambda i: (i + h, 0))] if gated else []
        )

    for arr in (w.q, w.scale) + ((w.min,) if w.min is not None else ()):
        s = rows(arr)
        operands += [arr] * len(s)
        specs += s
    aliases = append_epilogue(operands, specs, vec_n, bias, residual, out)

    kernel = functools.partial(
        _kernel,
        k=k,
        bn=bn,
        bk=bk,
        gq=gq,
        int4=int4,
        symmetric=int4 and w.min is None,
        per_channel=per_channel,
        gated=gated,
        has_norm=norm is not None,
        has_min=w.min is not None,
        has_bias=bias is not None,
        has_res=residual is not None,
        eps=float(norm[1]) if norm is not None else 0.0,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_out,), x.dtype),
        grid=(n_out // bn,),
        in_specs=specs,
        out_specs=vec_n,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"gemv_{w.fmt}_gated" if gated else f"gemv_{w.fmt}",
    )(*operands)


def gemv_quant_reference(w, x: jax.Array, **kw) -> jax.Array:
    """The function `gemv_quant` computes, in plain jnp: dequantize to f32, then `gemv_reference`."""
    return gemv_reference(w.dequantize(jnp.float32), x, **kw)
