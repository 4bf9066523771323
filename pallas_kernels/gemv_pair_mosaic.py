"""A chain of GEMV pairs, x <- B_p (A_p x), as ONE persistent Mosaic GPU kernel: the step toward a layer in one
kernel, where the ~2-3 us that each kernel boundary costs at batch 1 (KERNEL_NOTES.md, run 9) is paid less often.

A pair is the shape of a transformer's FFN (A = w13, B = w2) and of attention + wo: the second product's
input is the first's output. Each CTA j owns the 64 rows R_j of u = A x (H = 64 x CTAs rows): it computes
them whole (A's rows R_j, all of x), then multiplies them at once by B's columns R_j, which needs no other
CTA's rows, and adds its partial y into the output with one TMA reduce-add (the L2 sums them; no atomics from
threads). So a pair has no barrier inside it; only the next pair, which reads y whole, waits at a grid barrier
(a GMEM semaphore) for every CTA's reduce-add. One `emit_pipeline` streams both matrices' tiles (64 x 256,
through `stages` shared-memory buffers), so the next matrix's first tiles are in flight while a CTA waits.

B's columns R_j are laid out by `arrange_pairs` (once, at load in a model) as D / 256 tiles of (64, 256) whose
row q holds four outputs' 64-wide slices of R_j (o = s * D/4 + t * 64 + q for the tile's four segments s),
so y's rows come out of row sums with a masked copy of u a segment, as A's do; column sums (a
reduction across the warpgroup's warps) cost more than the bytes did when tried.

Limits: every CTA must be resident at once (the barrier would never fill otherwise): H // 64 <= 128, under
an H100's or H200's 132 SMs, one CTA an SM by its shared memory. The semaphores are left at 0 for the next
call. Interpret mode cannot run a grid barrier (it runs programs one at a time), so this is checked on the
GPU (`scripts/gpu_check.py --phases pairs`, `tests/test_pallas_kernels.py`) and lowered in CI.

Measured (H100, bf16, A 8192 x 4096 and B 4096 x 8192; KERNEL_NOTES.md runs 12 and 13): 45.9-46.3 us a pair
against the Triton GEMVs' 48.8-49.3 (two kernels) and the bytes' 44.3 at the roofline: a pair's overhead
drops from ~4.8 us to ~1.6-2.0, of which the grid barrier is ~1.1 us.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gemv import kernel_name

TILE = (64, 256)
MAX_CTAS = 128
SEGMENTS = 4  # output segments in a B tile's row: 256 columns = 4 x 64 of u's rows


def check_shapes(h: int, d: int):
    bn, bk = TILE
    if h % bn or h // bn > MAX_CTAS or d % (bk * SEGMENTS) or d // bk > h // bn:
        raise ValueError(
            f"gemv_pair_chain needs H % {bn} == 0 with H // {bn} <= {MAX_CTAS} CTAs (all resident), "
            f"D % {bk * SEGMENTS} == 0 and D // {bk} <= H // {bn}: got H = {h}, D = {d}"
        )


def arrange_pairs(a: jax.Array, b: jax.Array) -> jax.Array:
    """A (P, H, D) and B (P, D, H) as (P, 2, H * D/256, 256): each matrix a run of (64, 256) tiles, CTA-major: A's
    tile (j, t) is A[64j:+64, 256t:+256]; B's tile (j, t) row q is B[o, 64j:+64] for o = s * D/4 + t * 64 + q,
    s = 0..3."""
    p, h, d = a.shape
    check_shapes(h, d)
    bn, bk = TILE
    ctas, tiles = h // bn, d // bk
    a_tiles = a.reshape(p, ctas, bn, tiles, bk).transpose(0, 1, 3, 2, 4)  # p, j, t, q, c
    b_tiles = b.reshape(p, SEGMENTS, tiles, bn, ctas, bn).transpose(0, 4, 2, 3, 1, 5)  # p, j, t, q, s, c
    return jnp.stack([a_tiles.reshape(p, h * tiles, bk), b_tiles.reshape(p, h * tiles, bk)], axis=1)


def gemv_pair_chain(w_pairs: jax.Array, x: jax.Array, *, stages: int = 5) -> jax.Array:
    """Every y_p of x_{p+1} = B_p A_p x_p, (P, D) f32; w_pairs from `arrange_pairs`, x (D,)."""
    bn, bk = TILE
    d = x.shape[0]
    pairs, hidden = w_pairs.shape[0], w_pairs.shape[2] * bk // d
    check_shapes(hidden, d)
    ctas, tiles = hidden // bn, d // bk  # D / 256: A's tiles along a row, B's tiles a CTA, x's and y's chunks
    tile = plgpu.Layout.WGMMA
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def body(w_gmem, x_gmem, ys_gmem, x_smem, y_smem, zero_smem, u_by_segment, x_barrier):
        j = lax.axis_index("cta")
        arrived = pl.get_global(plgpu.SemaphoreType.REGULAR)
        finished = pl.get_global(plgpu.SemaphoreType.REGULAR)

        def grid_barrier(n):  # the n-th of this call, 1-based: `arrived` only grows until the call ends
            plgpu.semaphore_signal(arrived, 1, memory_scope="gpu")
            plgpu.semaphore_wait(arrived, ctas * n, decrement=False, memory_scope="gpu")

        # Every y starts at 0 before anyone adds into it; u_by_segment's off-segment entries stay 0.
        zero_smem[...] = jnp.zeros((bk,), jnp.float32)
        for s in range(SEGMENTS):
            u_by_segment[s] = jnp.zeros((bk,), jnp.float32)
        plgpu.commit_smem()

        @pl.when(j < tiles)
        def _():
            for p in range(pairs):
                plgpu.copy_smem_to_gmem(zero_smem, ys_gmem.at[p, j])
            plgpu.wait_smem_to_gmem(0)

        plgpu.copy_gmem_to_smem(x_gmem, x_smem, x_barrier.at[0])
        plgpu.barrier_wait(x_barrier.at[0])
        grid_barrier(1)

        def step(idx, w_smem, u):
            p, second, t = idx
            wt = plgpu.load(w_smem, (), layout=tile).astype(jnp.float32)

            def a_rows(u):  # first matrix: u (my 64 rows) accumulates A's row sums against x's chunk t
                xt = plgpu.load(x_smem.at[t], (), layout=tile.reduce(0))
                row_sums = jnp.sum(wt * lax.broadcast_in_dim(xt, (bn, bk), (1,)), axis=1)
                return u * jnp.where(t == 0, 0.0, 1.0) + row_sums

            u = lax.cond(second == 0, a_rows, lambda u: u, u)

            @pl.when((second == 1) & (t == 0))
            def _():
                for s in range(SEGMENTS):
                    u_by_segment[s, pl.ds(s * bn, bn)] = u

            @pl.when(second == 1)
            def _():
                # Second matrix: tile t's segment s gives y's rows s * D/4 + t * 64 .. + 64 (arrange_pairs).
                for s in range(SEGMENTS):
                    us = plgpu.load(u_by_segment.at[s], (), layout=tile.reduce(0))
                    y_rows = jnp.sum(wt * lax.broadcast_in_dim(us, (bn, bk), (1,)), axis=1)
                    y_smem[s * (tiles // SEGMENTS) + t // SEGMENTS, pl.ds((t % SEGMENTS) * bn, bn)] = y_rows

                @pl.when(t == tiles - 1)
                def _():
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(y_smem, ys_gmem.at[p], reduction_op="add")
                    plgpu.wait_smem_to_gmem(0)

                    @pl.when(p < pairs - 1)
                    def _():
                        grid_barrier(p + 2)
                        plgpu.copy_gmem_to_smem(ys_gmem.at[p], x_smem, x_barrier.at[0])
                        plgpu.barrier_wait(x_barrier.at[0])

            return u

        plgpu.emit_pipeline(
            step,
            grid=(pairs, 2, tiles),
            in_specs=[
                plgpu.BlockSpec(
                    (bn, bk), lambda p, m, t: (((p * 2 + m) * ctas + j) * tiles + t, 0), transforms=transforms
                )
            ],
            max_concurrent_steps=stages,
            init_carry=plgpu.layout_cast(jnp.zeros((bn,), jnp.float32), tile.reduce(1)),
        )(w_gmem)
        # `arrived` may go back to 0 only once every CTA is past its last wait on it.
        plgpu.semaphore_signal(finished, 1, memory_scope="gpu")

        @pl.when(j == 0)
        def _():
            plgpu.semaphore_wait(finished, ctas, decrement=True, memory_scope="gpu")
            plgpu.semaphore_wait(arrived, ctas * pairs, decrement=True, memory_scope="gpu")

    ys = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((pairs, tiles, bk), jnp.float32),
        grid=(ctas,),
        grid_names=("cta",),
        scratch_types=[
            plgpu.SMEM((tiles, bk), jnp.float32),
            plgpu.SMEM((tiles, bk), jnp.float32),
            plgpu.SMEM((bk,), jnp.float32),
            plgpu.SMEM((SEGMENTS, bk), jnp.float32),
            plgpu.Barrier(num_arrivals=1, num_barriers=1),
        ],
        kernel_name=kernel_name("gemv_pair_mosaic", d, hidden, False, (pairs, stages)),
    )(w_pairs.reshape(-1, bk), x.astype(jnp.float32).reshape(tiles, bk))
    return ys.reshape(pairs, d)


def gemv_pair_chain_reference(a: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
    """The same chain in f32 (A (P, H, D), B (P, D, H) as they are)."""
    ys = []
    for a_p, b_p in zip(a, b):
        x = jnp.dot(
            b_p.astype(jnp.float32), jnp.dot(a_p.astype(jnp.float32), x, precision="highest"), precision="highest"
        )
        ys.append(x)
    return jnp.stack(ys)
