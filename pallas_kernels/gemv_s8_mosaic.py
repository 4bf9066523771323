"""GEMVs with int8 activations on Hopper's s8 tensor cores, through Mosaic GPU: int8 weights (one scale a
row) and int4 weights (GGUF Q4_0's bytes, f16 scales a group of 32), x's codes in blocks of 32 with a scale
each, as gemv_quant's `_a8` kernels multiply them with dp4a. Not on the model's path: alone, on Mistral-7B's
matrices, they measured from 7% faster (int4's w2, K in 2 splits) to 13% slower (int4's w13) than the Triton
dp4a kernels (KERNEL_NOTES.md, run 12), and their products leave the warpgroup's threads idle (a WGMMA a
tile, a few f32 ops a block), which a persistent layer kernel (gemv_pair_mosaic.py) needs. In a persistent
layout (x's operands resident, every SM one CTA) the int4 one ran 85-87% of the roofline against Triton's
92-93%, where a bare TMA ring reads 95-97%: ~5% is lost around the ring (x's resident operands), ~6% in the
products (run 13).
`scripts/gpu_check.py --phases s8` times them beside the Triton ones.

Each CTA owns 64 rows; TMA streams their (64, 256-byte) tiles through `stages` shared-memory buffers. The
x operand of a tile's WGMMA (N columns, one a block of x) is block-diagonal (`block_diagonal`): column c
holds x's codes where the tile's block c sits and zeros elsewhere, so the s32 accumulator's columns are the
tile's per-block dot products, and an f32 epilogue weights each by its scales before the columns are summed.
int8: the weight tile is the WGMMA's A operand as it lies in shared memory. int4: the packed tile is loaded
into registers in the 8-bit WGMMA layout; its low nibbles (w & 0x0F, 0..15: the -8 comes back through x's
block sums) and its high nibbles (w & 0xF0 read as s8, = 16 (n - 8) exactly, because `prepare_int4` stores
them XOR 8, once, at load) are two register-A WGMMAs against x's first and second halves of each block.
Interpret mode runs no WGMMA: the CPU tests check the operand layouts by emulating the products
(tests/test_pallas_kernels.py), the GPU tests the kernels; `gemv_s8_reference` and `gemv_s4_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gemv import kernel_name
from pallas_kernels.gemv_mosaic import write_rows
from yalm_jax.quant import ACT_BLOCK, QuantizedMatrix

ROWS, TILE_BYTES = 64, 256  # a CTA's rows (one WGMMA's M) and a tile's bytes along K
X_BLOCK = ACT_BLOCK  # x's codes come in the model's int8 activation blocks
TILED_8BIT = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
TILED_F16_NARROW = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))


def block_diagonal(values: jax.Array, block: int, blocks_per_tile: int) -> jax.Array:
    """(blocks_per_tile, len(values)) int8: row c keeps the values of block c of every tile, zeros elsewhere."""
    which = (jnp.arange(values.shape[0]) // block) % blocks_per_tile
    return jnp.where(which[None, :] == jnp.arange(blocks_per_tile)[:, None], values[None, :], 0).astype(jnp.int8)


def prepare_int4(q_packed: jax.Array) -> jax.Array:
    """Q4_0 bytes (N, K/2) uint8, as gemv_s4_mosaic reads them: int8, high nibbles XOR 8 (see the module doc)."""
    return lax.bitcast_convert_type(q_packed ^ jnp.uint8(0x80), jnp.int8)


def _tensor_core_gemv(name, n, k_tiles, cols, tiled, per_tile, step, stages, splits) -> jax.Array:
    """The CTA skeleton both kernels share: out[r] = sum over tiles and columns of step(...)'s (64, cols) f32.

    tiled: (array, block shape, per CTA's rows?, transforms) streamed a tile a step; per_tile: (k_tiles,
    cols) f32 arrays read whole into shared memory once (too few bytes a step for a TMA copy), whose row kk
    step gets broadcast over the rows; step(tile refs..., per-tile rows..., ) -> (64, cols) f32. With
    `splits` > 1 each CTA takes 1/splits of the tiles (more CTAs where N / 64 leaves SMs idle) and XLA adds
    the splits' partial rows after the kernel.
    """
    if k_tiles % splits:
        raise ValueError(f"{splits} splits do not divide {k_tiles} tiles")
    split_tiles = k_tiles // splits
    acc_layout = plgpu.Layout.WGMMA

    def body(*refs):
        tiled_gmem, per_tile_gmem = refs[: len(tiled)], refs[len(tiled) : len(tiled) + len(per_tile)]
        o_gmem, o_smem, *per_tile_smem, barrier = refs[len(tiled) + len(per_tile) :]
        i, first = lax.axis_index("rows"), lax.axis_index("split") * split_tiles
        for c, (src, dst) in enumerate(zip(per_tile_gmem, per_tile_smem)):
            plgpu.copy_gmem_to_smem(src, dst, barrier.at[c])
        for c in range(len(per_tile)):
            plgpu.barrier_wait(barrier.at[c])

        def pipeline_step(idx, *args):
            *tile_refs, total = args
            rows = [
                lax.broadcast_in_dim(
                    plgpu.load(ref.at[first + idx[0]], (), layout=acc_layout.reduce(0)), (ROWS, cols), (1,)
                )
                for ref in per_tile_smem
            ]
            return total + step(*tile_refs, *rows)

        specs = [
            plgpu.BlockSpec(
                shape, (lambda kk: (i, first + kk)) if by_rows else (lambda kk: (0, first + kk)), transforms=transforms
            )
            for _, shape, by_rows, transforms in tiled
        ]
        total = plgpu.emit_pipeline(
            pipeline_step,
            grid=(split_tiles,),
            in_specs=specs,
            max_concurrent_steps=stages,
            init_carry=plgpu.layout_cast(jnp.zeros((ROWS, cols), jnp.float32), acc_layout),
        )(*tiled_gmem)
        write_rows(jnp.sum(total, axis=1), o_smem, o_gmem.at[lax.axis_index("split")], i)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((splits, n), jnp.float32),
        grid=(n // ROWS, splits),
        grid_names=("rows", "split"),
        scratch_types=[
            plgpu.SMEM((ROWS,), jnp.float32),
            *[plgpu.SMEM((k_tiles, cols), jnp.float32) for _ in per_tile],
            plgpu.Barrier(num_arrivals=1, num_barriers=len(per_tile)),
        ],
        kernel_name=name,
    )(*[t[0] for t in tiled], *per_tile).sum(axis=0)


def _block_sums(a, b_ref, cols):
    """One WGMMA of a (ref or int8 registers) by b's transposed view, into a fresh s32 (64, cols) accumulator."""

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b_ref, (1, 0)))

    zeros = plgpu.layout_cast(jnp.zeros((ROWS, cols), jnp.int32), plgpu.Layout.WGMMA)
    return pl.run_state(mma)(plgpu.ACC.init(zeros)).astype(jnp.float32)


def _check(q, what):
    n, row_bytes = q.shape
    if n % ROWS or row_bytes % TILE_BYTES:
        raise ValueError(f"{what} needs N % {ROWS} == 0 and a row's bytes % {TILE_BYTES} == 0: got {q.shape}")


def gemv_s8_mosaic(
    q: jax.Array, row_scale: jax.Array, x_codes: jax.Array, x_scales: jax.Array, *, stages: int = 6, splits: int = 1
) -> jax.Array:
    """y = (q * row_scale[:, None]) @ (x_codes * x_scales, a scale a block of 32), f32.
    q (N, K) int8, row_scale (N,) f32, x_codes (K,) int8, x_scales (K // 32,) f32."""
    n, k = q.shape
    _check(q, "gemv_s8_mosaic")
    cols = TILE_BYTES // X_BLOCK

    def step(q_smem, x_smem, x_scale):
        return _block_sums(q_smem, x_smem, cols) * x_scale

    y = _tensor_core_gemv(
        kernel_name("gemv_s8_mosaic", n, k, False, (ROWS, TILE_BYTES, stages, splits)), n, k // TILE_BYTES, cols,
        [(q, (ROWS, TILE_BYTES), True, TILED_8BIT),
         (block_diagonal(x_codes, X_BLOCK, cols), (cols, TILE_BYTES), False, TILED_8BIT)],
        [x_scales.reshape(-1, cols)], step, stages, splits,
    )  # fmt: skip
    return y * row_scale


def gemv_s4_mosaic(
    q4: jax.Array, group_scales: jax.Array, x_codes: jax.Array, x_scales: jax.Array, *, stages: int = 4, splits: int = 1
) -> jax.Array:
    """y = W x for Q4_0 weights, f32: q4 (N, K/2) from `prepare_int4`, group_scales (N, K // 32) f16 (W's
    value = scale * (nibble - 8)), x_codes (K,) int8, x_scales (K // 32,) f32."""
    n, k = q4.shape[0], 2 * q4.shape[1]
    _check(q4, "gemv_s4_mosaic")
    cols = TILE_BYTES // (X_BLOCK // 2)  # a 256-byte tile holds 16 blocks of 32 weights
    halves = x_codes.reshape(-1, 2, X_BLOCK // 2)  # a block's weights 0-15 are low nibbles, 16-31 high ones
    low_x, high_x = (block_diagonal(halves[:, h].reshape(-1), X_BLOCK // 2, cols) for h in (0, 1))
    low_offsets = 8.0 * jnp.sum(halves[:, 0].astype(jnp.float32), axis=1)

    def step(q_smem, low_smem, high_smem, scale_smem, x_scale, low_offset):
        w = plgpu.load(q_smem, (), layout=plgpu.Layout.WGMMA_8BIT)
        low = _block_sums(w & jnp.int8(0x0F), low_smem, cols) - low_offset
        high = _block_sums(w & jnp.int8(-16), high_smem, cols) * (1 / 16)
        scale = plgpu.load(scale_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        return (low + high) * x_scale * scale

    return _tensor_core_gemv(
        kernel_name("gemv_s4_mosaic", n, k, False, (ROWS, TILE_BYTES, stages, splits)), n, k // 2 // TILE_BYTES, cols,
        [(q4, (ROWS, TILE_BYTES), True, TILED_8BIT),
         (low_x, (cols, TILE_BYTES), False, TILED_8BIT),
         (high_x, (cols, TILE_BYTES), False, TILED_8BIT),
         (group_scales, (ROWS, cols), True, TILED_F16_NARROW)],
        [x_scales.reshape(-1, cols), low_offsets.reshape(-1, cols)], step, stages, splits,
    )  # fmt: skip


def _x_values(x_codes, x_scales):
    return x_codes.astype(jnp.float32) * jnp.repeat(x_scales, X_BLOCK)


def gemv_s8_reference(q, row_scale, x_codes, x_scales) -> jax.Array:
    return jnp.dot(q.astype(jnp.float32), _x_values(x_codes, x_scales), precision="highest") * row_scale


def gemv_s4_reference(q_packed, group_scales, x_codes, x_scales) -> jax.Array:
    """From the Q4_0 bytes as they are (uint8, before `prepare_int4`), dequantized as the model does."""
    w = QuantizedMatrix(q=q_packed, scale=group_scales, min=None, fmt="int4", group=X_BLOCK).dequantize(jnp.float32)
    return jnp.dot(w, _x_values(x_codes, x_scales), precision="highest")
