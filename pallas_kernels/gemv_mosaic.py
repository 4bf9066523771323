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
        write_rows(stream(w_gmem, x_gmem), o_smem, o_gmem, i)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((n,), x.dtype),
        grid=(n // bn,),
        grid_names=("rows",),
        scratch_types=[plgpu.SMEM((bn,), x.dtype)],
        kernel_name=kernel_name("gemv_mosaic", n, k, False, (bn, bk, stages)),
        interpret=_interpret_params() if interpret else None,
    )(w, x)


def write_rows(rows: jax.Array, o_smem, o_gmem, i):
    """CTA i's block of output rows out to GMEM (rows -> shared memory -> one TMA copy), waited for."""
    o_smem[...] = rows.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(i * o_smem.shape[0], o_smem.shape[0])])
    plgpu.wait_smem_to_gmem(0)


def _interpret_params():
    # Not exported by jax.experimental.pallas.mosaic_gpu in jax 0.10; only tests on the CPU ask for it.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
