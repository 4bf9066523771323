"""The dense GEMV y = W x through Pallas' Mosaic GPU lowering, to measure it against the Triton one.

jax 0.11 makes Mosaic GPU Pallas' default GPU lowering and keeps Triton deprecated; the issue asks to
choose between them by measurement. This is the same product in Mosaic GPU's model, which
`scripts/gpu_check.py --phases mosaic` checks and times beside the Triton kernel (gemv.py). On an H100
it came out 2-8% slower than Triton on all five Mistral-7B matrices (BENCHMARKS.md, run 6), so the
model's kernels stay Triton and this one is not on the model's path: it is kept, and lowered in CI, for
when jax drops the Triton lowering.

Mosaic GPU programs a warpgroup (128 threads) at a time and stages operands in shared memory through
the TMA copy engine: each CTA owns `block_n` rows and `emit_pipeline` streams their (block_n, block_k)
tiles and x's chunks through `stages` shared-memory buffers, so several tiles' loads are in flight
while one is reduced (the Triton kernel's K loop is not software-pipelined). A tile is read from
shared memory in the WGMMA register layout (rows spread over the warpgroup; swizzled so the reads
are free of bank conflicts); x's chunk in that layout's column form, broadcast along the rows for
free; the row sums come out in the row form, accumulated in f32 across the pipeline. Limits of the
lowering, found by lowering on the CPU: TMA copies move at most 256 elements a dimension, and the
layout wants block_n a multiple of 64.

`gemv.gemv_reference` is its reference.

`gemv_s8_mosaic` is an int8 GEMV with int8 activations on Hopper's s8 tensor cores: TMA streams (64, 256)
int8 weight tiles into shared memory and one WGMMA a tile multiplies them, with no dequantization in
registers, by x's codes laid out block-diagonally (`block_diagonal_codes`: column c of the (256, 8) operand
holds x's c-th block of 32 and zeros elsewhere), so the s32 accumulator's 8 columns are the tile's 8 block
dot products and the f32 epilogue applies x's block scales (the numerics of gemv_quant's int8_a8 path: x in
blocks of 32, one weight scale a row). It is not on the model's path: it measured 5-9% slower than the
Triton dp4a kernel on Mistral-7B's matrices (KERNEL_NOTES.md, run 12), but it leaves the warpgroup's
threads idle, which a persistent layer kernel (gemv_pair_mosaic.py) needs. `gemv_s8_reference` is its
reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gemv import kernel_name

# block_n, block_k, stages: the best of five tiles on three of Mistral-7B's five matrices (H100, run 6).
DEFAULT_CONFIG = (64, 256, 3)


def gemv_mosaic(
    w: jax.Array, x: jax.Array, *, config: tuple[int, int, int] | None = None, interpret: bool = False
) -> jax.Array:
    """y = W x in x's dtype, accumulated in f32; w (N, K) bf16/f16, N and K multiples of the tile.

    `interpret=True` runs it in Mosaic GPU's interpreter (any machine), which has no register layouts or
    shared-memory transforms: the same pipeline, loads and sums without them.
    """
    n, k = w.shape
    bn, bk, stages = config or DEFAULT_CONFIG
    if n % bn or k % bk or bn % 64 or bk > 256:
        raise ValueError(f"gemv_mosaic needs N % {bn} == 0, K % {bk} == 0, block_n % 64 == 0, block_k <= 256")
    tile = plgpu.Layout.WGMMA
    swizzle = min(128, bk * w.dtype.itemsize)
    transforms = (plgpu.TilingTransform((8, swizzle // w.dtype.itemsize)), plgpu.SwizzleTransform(swizzle))

    def load(ref, layout):
        return ref[...] if interpret else plgpu.load(ref, (), layout=layout)

    def body(w_gmem, x_gmem, o_gmem, o_smem):
        i = lax.axis_index("rows")

        def step(_, w_smem, x_smem, acc):
            wt = load(w_smem, tile).astype(jnp.float32)
            xt = load(x_smem, tile.reduce(0)).astype(jnp.float32)
            return acc + jnp.sum(wt * lax.broadcast_in_dim(xt, (bn, bk), (1,)), axis=1)

        acc = jnp.zeros((bn,), jnp.float32)
        stream = plgpu.emit_pipeline(
            step,
            grid=(k // bk,),
            in_specs=[
                plgpu.BlockSpec((bn, bk), lambda kk: (i, kk), transforms=() if interpret else transforms),
                plgpu.BlockSpec((bk,), lambda kk: (kk,)),
            ],
            max_concurrent_steps=stages,
            init_carry=acc if interpret else plgpu.layout_cast(acc, tile.reduce(1)),
        )
        o_smem[...] = stream(w_gmem, x_gmem).astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(i * bn, bn)])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((n,), x.dtype),
        grid=(n // bn,),
        grid_names=("rows",),
        scratch_types=[plgpu.SMEM((bn,), x.dtype)],
        kernel_name=kernel_name("gemv_mosaic", n, k, False, (bn, bk, stages)),
        interpret=_interpret_params() if interpret else None,
    )(w, x)


S8_TILE = (64, 256)  # rows, K a tile: one WGMMA of M = 64 over 8 blocks of 32


def block_diagonal_codes(x_codes: jax.Array) -> jax.Array:
    """(8, K) int8: row c keeps x's codes in block c of every 256-wide tile (blocks of 32), zeros elsewhere."""
    block = (jnp.arange(x_codes.shape[0]) // 32) % 8
    return jnp.where(block[None, :] == jnp.arange(8)[:, None], x_codes[None, :], 0).astype(jnp.int8)


def gemv_s8_mosaic(
    q: jax.Array, row_scale: jax.Array, x_codes: jax.Array, x_scales: jax.Array, *, stages: int = 6
) -> jax.Array:
    """y = (q * row_scale[:, None]) @ (x_codes * x_scales repeated over blocks of 32), f32.

    q (N, K) int8, row_scale (N,) f32, x_codes (K,) int8, x_scales (K // 32,) f32; N % 64 == 0, K % 256 == 0.
    """
    n, k = q.shape
    bn, bk = S8_TILE
    if n % bn or k % bk:
        raise ValueError(f"gemv_s8_mosaic needs N % {bn} == 0 and K % {bk} == 0: got {q.shape}")
    tile = plgpu.Layout.WGMMA
    transforms = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))

    def body(q_gmem, x_gmem, xs_gmem, o_gmem, o_smem, xs_smem, xs_barrier):
        i = lax.axis_index("rows")
        # x's scales whole, once: 8 of them a step are too few bytes for a TMA copy of their own.
        plgpu.copy_gmem_to_smem(xs_gmem, xs_smem, xs_barrier.at[0])
        plgpu.barrier_wait(xs_barrier.at[0])

        def step(idx, q_smem, x_smem, total):
            def mma(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(x_smem, (1, 0)))

            blocks = pl.run_state(mma)(plgpu.ACC.init(plgpu.layout_cast(jnp.zeros((bn, 8), jnp.int32), tile)))
            scales = plgpu.load(xs_smem.at[idx[0]], (), layout=tile.reduce(0))
            return total + blocks.astype(jnp.float32) * lax.broadcast_in_dim(scales, (bn, 8), (1,))

        total = plgpu.emit_pipeline(
            step,
            grid=(k // bk,),
            in_specs=[
                plgpu.BlockSpec((bn, bk), lambda kk: (i, kk), transforms=transforms),
                plgpu.BlockSpec((8, bk), lambda kk: (0, kk), transforms=transforms),
            ],
            max_concurrent_steps=stages,
            init_carry=plgpu.layout_cast(jnp.zeros((bn, 8), jnp.float32), tile),
        )(q_gmem, x_gmem)
        o_smem[...] = jnp.sum(total, axis=1)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(i * bn, bn)])
        plgpu.wait_smem_to_gmem(0)

    y = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((n,), jnp.float32),
        grid=(n // bn,),
        grid_names=("rows",),
        scratch_types=[
            plgpu.SMEM((bn,), jnp.float32),
            plgpu.SMEM((k // bk, 8), jnp.float32),
            plgpu.Barrier(num_arrivals=1, num_barriers=1),
        ],
        kernel_name=kernel_name("gemv_s8_mosaic", n, k, False, (bn, bk, stages)),
    )(q, block_diagonal_codes(x_codes), x_scales.reshape(k // bk, 8))
    return y * row_scale


def gemv_s8_reference(q, row_scale, x_codes, x_scales) -> jax.Array:
    x = x_codes.astype(jnp.float32) * jnp.repeat(x_scales, 32)
    return jnp.dot(q.astype(jnp.float32), x, precision="highest") * row_scale


def _interpret_params():
    # Not exported by jax.experimental.pallas.mosaic_gpu in jax 0.10; only tests on the CPU ask for it.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
