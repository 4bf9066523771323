"""Batch-1 matrix-vector products y = W x for W of shape (N, K), row-major.

Decode reads every weight once per token, so this kernel is bound by memory
bandwidth: each program owns `block_n` rows and walks K in chunks of `block_k`
columns, so one row chunk is a contiguous run of `block_k` elements (wide,
coalesced loads). Products accumulate in f32 in a (block_n, block_k) register
tile that is reduced along K once, at the end.

Fused forms, each saving a kernel launch and a round trip of the vector:
  * `norm=(g, eps)`: the RMS norm of x is computed by every program (x is tiny
    and sits in L2), so y = W rms_norm(x) needs no separate norm kernel;
  * `gated=True`: W holds gate rows then up rows (2H, K); y = act(W_g x) * (W_u x),
    act being silu or GELU's tanh approximation (`activate`);
  * `bias`, `residual`: y = W x + b + r, added in f32 before the one rounding.

`gemv_reference` is the same function in plain jnp, for tests and the CPU.
Lowered through Pallas' Triton backend on the GPU; `interpret=True` runs it
anywhere (CI does, at small shapes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# (block_n, block_k, num_warps, num_stages), measured on one H100 80GB HBM3 (see KERNEL_NOTES.md).
DEFAULT_CONFIG = (4, 1024, 4, 2)
# Per shape (n_out, k, gated), where a sweep found a better one than the default.
# Mistral-7B's shapes, from scripts/gpu_check.py on one H100 80GB HBM3, 2026-11-25.
CONFIGS: dict[tuple[int, int, bool], tuple[int, int, int, int]] = {
    (6144, 4096, False): (4, 4096, 8, 2),  # wqkv
    (4096, 4096, False): (1, 4096, 4, 2),  # wo
    (14336, 4096, True): (4, 4096, 8, 2),  # w13, gated
    (4096, 14336, False): (2, 2048, 4, 2),  # w2
    (32000, 4096, False): (2, 2048, 4, 2),  # output
    # SmolLM2-135M, ranked by the GPU's own kernel times (run 6); the output's best is the default (20.4 us).
    (960, 576, False): (2, 1024, 4, 2),  # wqkv: 2.4 us against the default's 2.7
    (576, 576, False): (2, 1024, 4, 2),  # wo: 2.0 us against 2.4
    (1536, 576, True): (2, 1024, 4, 2),  # w13, gated: 3.4 us against 3.6
    (576, 1536, False): (2, 4096, 8, 2),  # w2: 2.4 us against 5.1
    # One device's shards of Mistral-7B at tp=2 (`sweep:bfloat16:mistral_tp2`, 2026-11-26, BENCHMARKS.md run 18);
    # w2's (4096 x 7168) best is the default (21.7 us).
    (3072, 4096, False): (4, 4096, 8, 2),  # wqkv: 10.9 us against the default's 11.3
    (4096, 2048, False): (2, 4096, 8, 2),  # wo: 7.3 us against 7.7
    (7168, 4096, True): (4, 4096, 8, 2),  # w13, gated: 41.7 us against 43.2
    (16000, 4096, False): (2, 4096, 8, 2),  # output (vocabulary-sharded): 43.7 us against 45.0
}


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap."""
    return min(cap, n & -n)


def _rms_scale(x_ref, k: int, bk: int, eps: float):
    """rsqrt(mean(x^2) + eps) of the whole vector, in f32, walking x in chunks of bk."""

    def body(i, acc):
        xb = _chunk(x_ref, pl.multiple_of(i * bk, bk), bk, k).astype(jnp.float32)
        return acc + xb * xb

    acc = lax.fori_loop(0, pl.cdiv(k, bk), body, jnp.zeros((bk,), jnp.float32))
    return lax.rsqrt(jnp.sum(acc) / k + eps)


# Weights stream through once per token: with evict_first they do not push x out of L2.
EVICT_FIRST = True


def _load_w(ref, mask=None):
    # A float `other`: the Triton lowering casts an int one to bf16 but not to fp8.
    other = None if mask is None else 0.0 if jnp.issubdtype(ref.dtype, jnp.floating) else 0
    if EVICT_FIRST:
        return plt.load(ref, mask=mask, other=other, eviction_policy="evict_first")
    return ref[...] if mask is None else plt.load(ref, mask=mask, other=other)


def _chunk(ref, k0, bk: int, k: int, weights: bool = False):
    """Columns k0 .. k0 + bk of a vector (K,) or of a row block (bn, K); past K (a row length that
    bk does not divide, as SmolLM2's 576) they read as 0, so one wide chunk covers a short tail."""
    idx = (pl.ds(k0, bk),) if ref.ndim == 1 else (slice(None), pl.ds(k0, bk))
    mask = None
    if k % bk:
        mask = k0 + lax.broadcasted_iota(jnp.int32, (1, bk) if ref.ndim == 2 else (bk,), ref.ndim - 1) < k
    if weights:
        return _load_w(ref.at[idx], mask)
    return ref[idx] if mask is None else plt.load(ref.at[idx], mask=mask, other=0)


def activate(y: jax.Array, activation: str) -> jax.Array:
    """The gated FFN's activation of f32 values, in ops that lower to Triton: "silu" or "gelu_tanh"."""
    if activation == "silu":
        return y / (1.0 + jnp.exp(-y))
    if activation == "gelu_tanh":
        return 0.5 * y * (1.0 + jnp.tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))
    raise ValueError(f"unknown activation {activation!r}")


def _gemv_kernel(*refs, k, bn, bk, gated, activation, has_norm, has_bias, has_res, eps):
    refs = list(refs)
    x_ref = refs.pop(0)
    g_ref = refs.pop(0) if has_norm else None
    w_refs = [refs.pop(0)] + ([refs.pop(0)] if gated else [])
    x_dtype = x_ref.dtype

    scale = _rms_scale(x_ref, k, bk, eps) if has_norm else None

    def body(i, accs):
        k0 = pl.multiple_of(i * bk, bk)
        xb = _chunk(x_ref, k0, bk, k)
        if has_norm:
            # Same roundings as ops.rms_norm: normalise in f32, round, scale by g in x's dtype.
            xb = (xb.astype(jnp.float32) * scale).astype(x_dtype) * _chunk(g_ref, k0, bk, k)
        xb = xb.astype(jnp.float32)[None, :]
        return tuple(a + _chunk(w, k0, bk, k, weights=True).astype(jnp.float32) * xb for a, w in zip(accs, w_refs))

    zeros = tuple(jnp.zeros((bn, bk), jnp.float32) for _ in w_refs)
    accs = lax.fori_loop(0, pl.cdiv(k, bk), body, zeros)
    write_epilogue(refs, [jnp.sum(a, axis=1) for a in accs], gated, activation, has_bias, has_res)


def gemv(
    w: jax.Array,
    x: jax.Array,
    *,
    bias: jax.Array | None = None,
    residual: jax.Array | None = None,
    norm: tuple[jax.Array, float] | None = None,
    gated: bool = False,
    activation: str = "silu",
    config: tuple[int, int, int, int] | None = None,
    out: jax.Array | None = None,
    out_dtype=None,
    interpret: bool = False,
) -> jax.Array:
    """y = W x (+ bias) (+ residual), in `out_dtype` (default x's), accumulated in f32.

    w: (N, K) in f32/bf16/f16; x: (K,). With `norm=(g, eps)` x is replaced by
    rms_norm(x) * g first. With `gated=True`, N = 2H and the result (H,) is
    act(W[:H] x) * W[H:] x, act = `activate(., activation)`. `config` =
    (block_n, block_k, num_warps, num_stages); block_n is cut down to a power
    of two that divides N, block_k to K's next power of two. `out`, if
    given, is a buffer of the result's shape and dtype aliased to the result
    (tests fill it with NaN to catch unwritten elements).
    """
    n, k = w.shape
    if x.shape != (k,):
        raise ValueError(f"x has shape {x.shape}, expected ({k},)")
    n_out = n // 2 if gated else n
    if gated and n % 2:
        raise ValueError(f"gated gemv needs an even row count, got {n}")
    bn, bk, num_warps, num_stages = config or CONFIGS.get((n_out, k, gated), DEFAULT_CONFIG)
    bn = _pow2_divisor(n_out, bn)
    bk = min(bk, pl.next_power_of_2(k))  # a K it does not divide ends in a masked chunk
    grid = (n_out // bn,)

    vec_k = pl.BlockSpec((k,), lambda i: (0,))
    vec_n = pl.BlockSpec((bn,), lambda i: (i,))
    operands, specs = [x], [vec_k]
    if norm is not None:
        operands.append(norm[0].astype(x.dtype))
        specs.append(vec_k)
    operands.append(w)
    specs.append(pl.BlockSpec((bn, k), lambda i: (i, 0)))
    if gated:
        operands.append(w)
        specs.append(pl.BlockSpec((bn, k), lambda i, h=n_out // bn: (i + h, 0)))
    aliases = append_epilogue(operands, specs, vec_n, bias, residual, out)

    kernel = functools.partial(
        _gemv_kernel,
        k=k,
        bn=bn,
        bk=bk,
        gated=gated,
        activation=activation,
        has_norm=norm is not None,
        has_bias=bias is not None,
        has_res=residual is not None,
        eps=float(norm[1]) if norm is not None else 0.0,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n_out,), out_dtype or x.dtype),
        grid=grid,
        in_specs=specs,
        out_specs=vec_n,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=kernel_name("gemv", n_out, k, gated, (bn, bk, num_warps)),
    )(*operands)


def kernel_name(kind: str, n_out: int, k: int, gated: bool, tile: tuple[int, ...]) -> str:
    """A GEMV kernel's name with its shape and tile (its config), so a profile tells them apart."""
    return f"{kind}{'_gated' if gated else ''}_{n_out}x{k}_{'x'.join(map(str, tile))}"


def write_epilogue(refs: list, ys: list, gated: bool, activation: str, has_bias: bool, has_res: bool) -> jax.Array:
    """The kernel side of `append_epilogue`: from the row sums `ys` (f32; gate and up when gated), adds the
    bias and residual among the remaining `refs` and writes the output ref, the last of them. Returns what
    it wrote."""
    y = activate(ys[0], activation) * ys[1] if gated else ys[0]
    if has_bias:
        y = y + refs.pop(0)[...].astype(jnp.float32)
    if has_res:
        y = y + refs.pop(0)[...].astype(jnp.float32)
    o_ref = refs[-1]  # any ref before it is a poison buffer aliased to it (tests)
    o_ref[...] = y = y.astype(o_ref.dtype)
    return y


def append_epilogue(operands: list, specs: list, vec_n, bias, residual, out) -> dict[int, int]:
    """Appends the epilogue's operands (bias, residual, then `out` aliased to the result) after the
    kernel's own; returns the pallas_call aliases. Shared by the dense and quantized GEMVs."""
    for v in (bias, residual):
        if v is not None:
            operands.append(v)
            specs.append(vec_n)
    if out is None:
        return {}
    operands.append(out)
    specs.append(vec_n)
    return {len(operands) - 1: 0}


def rms_norm_reference(x: jax.Array, g: jax.Array, eps: float) -> jax.Array:
    """The norm the kernels fuse, with their roundings: normalise in f32, round to x's dtype, scale by g."""
    xf = x.astype(jnp.float32)
    return (xf * lax.rsqrt(jnp.mean(xf * xf) + eps)).astype(x.dtype) * g.astype(x.dtype)


def gemv_reference(
    w: jax.Array,
    x: jax.Array,
    *,
    bias: jax.Array | None = None,
    residual: jax.Array | None = None,
    norm: tuple[jax.Array, float] | None = None,
    gated: bool = False,
    activation: str = "silu",
    out_dtype=None,
) -> jax.Array:
    """The function `gemv` computes, in plain jnp (f32 accumulation, one final rounding)."""
    if norm is not None:
        x = rms_norm_reference(x, *norm)
    y = jnp.dot(w.astype(jnp.float32), x.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    if gated:
        gate, up = jnp.split(y, 2)
        act = {"silu": jax.nn.silu, "gelu_tanh": lambda g: jax.nn.gelu(g, approximate=True)}[activation]
        y = act(gate) * up  # jax.nn's own forms, not the kernel's `activate`, so each checks the other
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)
