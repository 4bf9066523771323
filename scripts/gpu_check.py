"""Checks and times the Pallas kernels and a Mistral-7B-shaped decode on one GPU.

    PYTHONUNBUFFERED=1 python scripts/gpu_check.py [--phases roof,sweep,attn,model] [--out DIR]

Phases: roof (read bandwidth: jnp.sum and torch.sum over 8 GiB), sweep (GEMV
block configs per Mistral shape, vs XLA's dot; `sweep:FORMAT[:SHAPES]` for
int8 / int4 / fp8_e4m3 weights (int8_a8 / int4_a8: multiplying int8 activations) or float32,
and SHAPES smollm2, or mistral_int8_h: w13 writing h's int8 form and w2 reading it), mosaic[:SHAPES] (the plain
GEMV through Mosaic GPU beside the Triton kernel, by the GPU's kernel times), overhead (a GEMV kernel's
fixed time and streaming rate, from its times against rows), s8 (int8 and int4 weights x int8
activations on s8 tensor cores through Mosaic GPU beside the Triton dp4a kernels), pairs (a chain of
GEMV pairs as one persistent Mosaic kernel beside one Triton kernel a matrix: gemv_pair_mosaic.py),
attn (decode attention at T=128 and 4096 vs the xla path), model (random bf16 Mistral-7B shape decoded
through yalm_jax.model.forward in a jitted lax.scan, pallas vs xla, at context
128 and 4096). `--smoke` runs every phase at toy shapes in interpret mode on
the CPU, to check the script itself. Prints a table last; logs go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from pallas_kernels import decode_attention as attn_mod  # noqa: E402
from pallas_kernels import gemv as gemv_mod  # noqa: E402
from yalm_jax import quant  # noqa: E402

ROWS: list[str] = []  # the final table
LOG: dict = {}


def row(s: str):
    print(s)
    ROWS.append(s)


def timed(fn, *args, reps=10, batches=5):
    """Median seconds per call: `reps` calls issued back to back, then one sync; `batches` of those."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times), times


# -- read roofline -------------------------------------------------------------------


def phase_roof(smoke):
    n = (1 << 20) if smoke else (4 << 30)  # bf16 elements: 8 GiB
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    t, _ = timed(f, x, reps=5)
    gbs = x.nbytes / t / 1e9
    del x
    row(f"roof  jnp.sum bf16 {n * 2 / 2**30:.0f} GiB: {t * 1e3:.2f} ms = {gbs:.0f} GB/s")
    LOG["roof_jnp_gbs"] = gbs
    from bench_gpu import torch_read_gb_s

    torch_gbs = None if smoke else torch_read_gb_s(n, reps=10)
    if torch_gbs is not None:
        row(f"roof  torch.sum bf16 8 GiB: {n * 2 / torch_gbs / 1e6:.2f} ms = {torch_gbs:.0f} GB/s")
        LOG["roof_torch_gbs"] = torch_gbs
    return LOG.get("roof_torch_gbs", gbs)


# -- GEMV ----------------------------------------------------------------------------

# name, rows, k, form: the four projections of a Mistral-7B layer and the output; SmolLM2-135M's.
GEMV_SHAPES = {
    "mistral": [
        ("wqkv+norm", 4096 + 2 * 1024, 4096, {"norm": True}),
        ("wo +residual", 4096, 4096, {"residual": True}),
        ("w13 gated+norm", 2 * 14336, 4096, {"gated": True, "norm": True}),
        ("w2 +residual", 4096, 14336, {"residual": True}),
        ("output", 32000, 4096, {}),
    ],
    "smollm2": [
        ("s wqkv+norm", 576 + 2 * 192, 576, {"norm": True}),
        ("s wo +residual", 576, 576, {"residual": True}),
        ("s w13 gated+norm", 2 * 1536, 576, {"gated": True, "norm": True}),
        ("s w2 +residual", 576, 1536, {"residual": True}),
        ("s output", 49152, 576, {}),
    ],
    "smoke": [("toy", 64, 256, {"norm": True}), ("toy gated", 128, 256, {"gated": True}), ("toy 576", 32, 576, {})],
}
# One device's shards at tensor parallelism tp=2 (parallel.py): half the heads and hidden rows; wo and w2 sum
# their partial products across the devices (a psum) before the residual, so their kernels add none.
GEMV_SHAPES["mistral_tp2"] = [
    ("wqkv+norm /2", 2048 + 2 * 512, 4096, {"norm": True}),
    ("wo /2", 4096, 2048, {}),
    ("w13 gated+norm /2", 2 * 7168, 4096, {"gated": True, "norm": True}),
    ("w2 /2", 4096, 7168, {}),
    ("output /2", 16000, 4096, {}),
]
GEMV_SHAPES["mistral_small"] = GEMV_SHAPES["mistral"][:2]  # wqkv and wo, the ones furthest from the roofline
# With int8 activations, w13's kernel rounds h for w2's, which reads it as it is (quant.Int8Vector), and wo's
# rounds the FFN's normed input for w13's.
GEMV_SHAPES["mistral_int8_h"] = [
    ("w13 gated+norm, h int8", 2 * 14336, 4096, {"gated": True, "norm": True, "int8_out": True}),
    ("w2 +residual, h int8", 4096, 14336, {"residual": True, "int8_in": True}),
    ("wo +residual, x int8 normed", 4096, 4096, {"residual": True, "int8_out": True, "norm_out": True}),
    ("w13 gated, x int8 normed, h int8", 2 * 14336, 4096, {"gated": True, "int8_in_normed": True, "int8_out": True}),
]
# Configs tried per weight format, (block_n, block_k, num_warps, num_stages); block_k counts elements
# (dense) or stored bytes (quantized). The products tile (block_n x block_k values, twice that for int4's
# nibbles) stays <= 16k f32 values so it fits the registers of 4-8 warps.
GRIDS = {
    "dense": [(4, 1024, 4, 2), (2, 2048, 4, 2), (4, 2048, 4, 2), (4, 2048, 8, 2), (8, 2048, 8, 2), (1, 4096, 4, 2),
              (2, 4096, 4, 2), (2, 4096, 8, 2), (4, 4096, 8, 2), (8, 1024, 8, 2), (16, 512, 4, 2), (16, 1024, 8, 2)],
    "dense_small_k": [(1, 1024, 4, 2), (2, 1024, 4, 2), (4, 1024, 4, 2), (8, 1024, 8, 2), (16, 1024, 8, 2),
                      (2, 512, 4, 2), (4, 512, 4, 2), (8, 512, 4, 2), (16, 512, 8, 2), (32, 512, 8, 2), (4, 256, 4, 2)],
    # Every program also reads all of x (twice with a fused norm): with few rows a program, that L2 traffic
    # rivals the 1-byte and half-byte weights' own, hence the taller, narrower tiles.
    "int8": [(2, 4096, 4, 2), (4, 4096, 8, 2), (4, 2048, 4, 2), (8, 2048, 8, 2), (2, 4096, 8, 2), (8, 1024, 4, 2),
             (16, 512, 4, 2), (16, 1024, 8, 2), (32, 512, 8, 2)],
    "int4": [(8, 2048, 8, 2), (4, 2048, 8, 2), (16, 1024, 8, 2), (8, 1024, 8, 2), (4, 2048, 4, 2), (16, 512, 8, 2),
             (16, 512, 4, 2), (32, 256, 8, 2), (64, 128, 8, 2)],
    "int8_out": [(32, 2048, 16, 2), (32, 2048, 8, 2), (32, 1024, 8, 2), (32, 1024, 4, 2), (32, 512, 8, 2),
                 (32, 512, 4, 2), (32, 256, 4, 2), (64, 1024, 16, 2), (64, 512, 8, 2), (64, 256, 8, 2)],
}  # fmt: skip


def _gemv_inputs(n, k, form, copies, fmt="bfloat16"):
    """`copies` distinct weight matrices (dense in `fmt`, or random QuantizedMatrix of that format), x and extras."""
    from bench_gpu import random_quantized

    keys = jax.random.split(jax.random.key(1), copies + 3)
    dtype = jnp.float32 if fmt == "float32" else jnp.bfloat16
    if fmt in ("bfloat16", "float32"):
        ws = [jax.random.normal(keys[i], (n, k), dtype) for i in range(copies)]
    else:  # FORMAT_a8: the same weights multiplying int8 activations
        ws = [random_quantized((n, k), fmt.removesuffix("_a8"), i) for i in range(copies)]
        ws = [quant.with_int8_activations(w) for w in ws] if fmt.endswith("_a8") else ws
    x = jax.random.normal(keys[-1], (k,), dtype)
    x = quant.to_int8_vector(x) if form.get("int8_in") else x
    if form.get("int8_in_normed"):  # rms_norm(x) rounded, as wo's kernel writes it for w13
        x = quant.to_int8_vector(x, (1.0 + 0.1 * jax.random.normal(keys[-2], (k,), dtype), 1e-5))
    n_out = n // 2 if form.get("gated") else n
    extra = {"int8_out": True} if form.get("int8_out") else {}
    if form.get("norm_out"):
        extra["norm_out"] = (1.0 + 0.1 * jax.random.normal(keys[-2], (n_out,), dtype), 1e-5)
    if form.get("norm"):
        extra["norm"] = (1.0 + 0.1 * jax.random.normal(keys[-2], (k,), dtype), 1e-5)
    if form.get("residual"):
        extra["residual"] = jax.random.normal(keys[-3], (n_out,), dtype)
    return ws, x, extra


def _gemv_chain(config, extra, interpret, xla=False):
    # Every copy once per call: a model-like stream of distinct weights, so L2 holds none.
    from yalm_jax import ops

    def f(ws, x):
        outs = []
        for w in ws:
            if xla:
                xx = x
                if "norm" in extra:
                    g, eps = extra["norm"]
                    xf = xx.astype(jnp.float32)
                    xx = (xf * lax.rsqrt(jnp.mean(xf * xf) + eps)).astype(x.dtype) * g
                y = jnp.dot(w, xx, preferred_element_type=jnp.float32)
                if "residual" in extra:
                    y = y + extra["residual"]
                outs.append(y.astype(x.dtype))
            else:
                outs.append(ops._gemv_for(w)(w, x, config=config, interpret=interpret, **extra))
        return outs

    return jax.jit(f)


def _kernel_us(fns: dict, ws, x, copies: int, label: str) -> dict:
    """Mean GPU duration (us, CUPTI) of each config's GEMV kernels: each chain runs once, in turn, in one
    trace, so the i-th run of `copies` gemv kernels is the i-th config's. {} where the profiler fails."""
    from bench_gpu import gpu_kernel_events

    def run_all():
        return [jax.block_until_ready(fn(ws, x)) for fn in fns.values()]

    try:
        events = gpu_kernel_events(run_all, label, "/tmp/yalm_jax_traces")
    except Exception as e:  # noqa: BLE001
        print(f"  profiler failed: {type(e).__name__}: {str(e)[:200]}")
        return {}
    gemvs = sorted((e for e in events if "gemv" in e["name"]), key=lambda e: e["ts"]) if isinstance(events, list) else []
    if len(gemvs) != copies * len(fns):
        print(f"  profiler: {len(gemvs)} gemv kernels for {len(fns)} configs x {copies}; falling back to wall time")
        return {}
    return {cfg: sum(e["dur"] for e in gemvs[i * copies : (i + 1) * copies]) / copies for i, cfg in enumerate(fns)}


def phase_sweep(smoke, roof, fmt="bfloat16", shapes="mistral"):
    """The GEMV configs of GRIDS for weights in `fmt` on `shapes`' matrices; the best of each goes into the
    kernel module's CONFIGS (printed at the end, for pasting)."""
    from pallas_kernels import gemv_quant

    shapes = GEMV_SHAPES["smoke" if smoke else shapes]
    dense = fmt in ("bfloat16", "float32")
    LOG.setdefault("sweep", {})
    best = {}
    for name, n, k, form in shapes:
        if smoke:
            grid = [(8, 64, 4, 2), (8, 512, 4, 2)]
        elif form.get("int8_out"):  # its programs round whole blocks of 32 rows
            grid = GRIDS["int8_out"]
        elif dense:
            grid = GRIDS["dense" if k > 1024 else "dense_small_k"]
        else:
            grid = GRIDS["int4" if fmt.startswith(("int4", "iq4")) else "int8"]
        probe, *_ = _gemv_inputs(n, k, form, 1, fmt)
        nbytes = probe[0].nbytes if not dense else n * k * jnp.dtype(probe[0].dtype).itemsize
        copies = 2 if smoke else max(4, min(64, int(1.5e9 // nbytes)))
        ws, x, extra = _gemv_inputs(n, k, form, copies, fmt)
        res = {}
        gated = form.get("gated", False)
        # Correctness of every config against the reference on the first copy.
        ref_fn = gemv_mod.gemv_reference if dense else gemv_quant.gemv_quant_reference
        ref = ref_fn(ws[0], x, gated=gated, **{f: v for f, v in extra.items() if f not in ("int8_out", "norm_out")})

        fns = {}

        def try_cfg(cfg):
            try:
                fn = _gemv_chain(cfg, dict(extra, gated=gated), smoke)
                out = fn(ws, x)[0]
                out = out[0] if extra.get("int8_out") else out  # y; its int8 form is the tests' to check
                err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
                t, _ = timed(fn, ws, x, reps=3 if smoke else 5)
                res[cfg] = (t / copies, err)
                fns[cfg] = fn
                print(f"  {fmt} {name} {cfg}: {t / copies * 1e6:.1f} us {nbytes / (t / copies) / 1e9:.0f} GB/s err {err:.1e}")
            except Exception as e:  # noqa: BLE001
                print(f"  {fmt} {name} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")

        for cfg in grid:
            try_cfg(cfg)
        if not res:
            row(f"gemv  {fmt} {name}: every config failed")
            continue
        # Wall time over a chain is the host's launch rate once kernels run faster than it launches them
        # (SmolLM2's ~2-4 us kernels): rank configs by the GPU's own kernel durations where the profiler works.
        gpu_us = _kernel_us(fns, ws, x, copies, f"sweep_{fmt}_{name.replace(' ', '_').replace('+', '')}")
        for cfg, us in gpu_us.items():
            print(f"  {fmt} {name} {cfg}: GPU {us:.2f} us a kernel (wall {res[cfg][0] * 1e6:.2f})")
            res[cfg] = (us * 1e-6, res[cfg][1])
        b = min(res, key=lambda c: res[c][0])
        best[(name, n, k)] = b
        n_out = n // 2 if gated else n
        if dense:
            gemv_mod.CONFIGS[(n_out, k, gated)] = b
        else:
            kind = gemv_quant.config_kinds(probe[0])[0]
            gemv_quant.CONFIGS[(kind, n_out, k, gated)] = b
        xla_note = ""
        if dense:  # XLA's dot on the same stream of weights.
            fx = _gemv_chain(None, dict(extra), smoke, xla=True)
            tx, _ = timed(fx, ws, x, reps=3 if smoke else 10)
            tx /= copies
            xla_note = f" | xla dot {tx * 1e6:7.1f} us {nbytes / tx / 1e9:5.0f} GB/s"
        t, err = res[b]
        row(
            f"gemv  {fmt:9s} {name:16s} {n}x{k}: pallas {t * 1e6:7.1f} us {nbytes / t / 1e9:5.0f} GB/s "
            f"({nbytes / t / 1e9 / roof:4.0%} roof) cfg {b} err {err:.1e}{xla_note}"
        )
        LOG["sweep"][f"{fmt} {name}"] = {str(c): v for c, v in res.items()} | {"best": b}
    return best


def phase_overhead(smoke, roof):
    """What a GEMV kernel costs apart from its bytes: kernel time (CUPTI) against rows at K = 4096 for each
    format at its Mistral tile, plain and with the fused norm, fitted as a fixed time plus bytes at a rate
    over the kernels of >= 8 MB (KERNEL_NOTES.md, run 9)."""
    k, rows = (256, (64, 128)) if smoke else (4096, (512, 1024, 2048, 4096, 8192, 16384, 32768))
    tiles = {"bfloat16": (4, 4096, 8, 2), "int4_a8": (8, 2048, 8, 2), "int8_a8": (4, 4096, 8, 2)}
    LOG["overhead"] = {}
    for fmt, tile in tiles.items():
        for form in ({}, {"norm": True}):
            label = f"{fmt}{' +norm' if form else ''}"
            points = []
            for n in rows:
                probe, *_ = _gemv_inputs(n, k, form, 1, fmt)
                nbytes = n * k * 2 if fmt == "bfloat16" else probe[0].nbytes
                copies = 2 if smoke else max(8, min(64, int(1.5e9 // nbytes)))
                ws, x, extra = _gemv_inputs(n, k, form, copies, fmt)
                fn = _gemv_chain(None if smoke else tile, extra, smoke)
                jax.block_until_ready(fn(ws, x))
                us = _kernel_us({tile: fn}, ws, x, copies, f"overhead_{fmt}_{n}_{bool(form)}").get(tile)
                if us:
                    points.append((nbytes, us))
                    print(f"  {label} {n}x{k}: {nbytes / 1e6:.2f} MB {us:.2f} us {nbytes / us / 1e3:.0f} GB/s")
            big = [(b, t) for b, t in points if b >= 8e6]
            LOG["overhead"][label] = points
            if len(big) < 2:
                row(f"gemv overhead {label}: too few kernel times to fit ({len(points)})")
                continue
            slope, fixed = np.polyfit(*zip(*big), 1)
            rate = 1e-3 / slope  # GB/s
            row(f"gemv overhead {label:16s}: {fixed:.2f} us a kernel + bytes at {rate:,.0f} GB/s "
                f"({rate / roof:.0%} roof), fit over {len(big)} kernels of 8-{big[-1][0] / 1e6:.0f} MB")  # fmt: skip


# Mosaic GPU tiles tried per shape: (block_n, block_k, stages); block_n a multiple of 64, block_k <= 256.
MOSAIC_GRID = [(64, 128, 4), (64, 256, 3), (128, 128, 4), (64, 64, 8), (128, 256, 2)]


def phase_mosaic(smoke, roof, shapes="mistral"):
    """The plain GEMV (no fused norm, gate or residual) through Mosaic GPU (gemv_mosaic.py) beside the Triton
    kernel with its tuned config, on the same stream of weights: the lowering choice, by the GPU's kernel times."""
    from pallas_kernels.gemv_mosaic import gemv_mosaic

    LOG.setdefault("mosaic", {})
    for name, n, k, form in GEMV_SHAPES["smoke" if smoke else shapes]:
        if form.get("gated"):
            n //= 2  # the gate's rows alone: a plain matrix of the same width
        copies = 2 if smoke else max(4, min(64, int(1.5e9 // (n * k * 2))))
        ws, x, _ = _gemv_inputs(n, k, {}, copies)
        ref = gemv_mod.gemv_reference(ws[0], x)
        fns, errs, walls = {}, {}, {}
        candidates = [("triton", None)] + [("mosaic", c) for c in MOSAIC_GRID]
        for kind, cfg in candidates:
            try:
                if kind == "triton":
                    fn = jax.jit(lambda ws, x: [gemv_mod.gemv(w, x, interpret=smoke) for w in ws])
                else:
                    fn = jax.jit(lambda ws, x, cfg=cfg: [gemv_mosaic(w, x, config=cfg) for w in ws])
                out = fn(ws, x)[0]
                diff = (out - ref).astype(jnp.float32)
                errs[(kind, cfg)] = float(jnp.linalg.norm(diff) / jnp.linalg.norm(ref.astype(jnp.float32)))
                walls[(kind, cfg)] = timed(fn, ws, x, reps=3 if smoke else 5)[0] / copies * 1e6
                fns[(kind, cfg)] = fn
            except Exception as e:  # noqa: BLE001
                print(f"  mosaic {name} {kind} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
        gpu_us = _kernel_us(fns, ws, x, copies, f"mosaic_{n}x{k}")
        nbytes = n * k * 2
        for key in fns:
            us = gpu_us.get(key, walls[key])
            gbs = nbytes / us / 1e3
            row(f"mosaic {name:16s} {n}x{k} {key[0]:6s} {str(key[1]):14s} {'GPU' if key in gpu_us else 'wall'} "
                f"{us:7.2f} us {gbs:5.0f} GB/s ({gbs / roof:4.0%} roof) err {errs[key]:.1e}")
        LOG["mosaic"][name] = {f"{kd} {c}": [gpu_us.get((kd, c)), walls[(kd, c)], errs[(kd, c)]] for kd, c in fns}


def phase_s8(smoke, roof):
    """int8 and int4 weights times int8 activations (blocks of 32) on the s8 tensor cores through Mosaic GPU
    (gemv_s8_mosaic) beside the Triton dp4a kernels (gemv_quant, _a8, x pre-rounded), on wo, w13 and w2's
    shapes, by the GPU's kernel times."""
    from pallas_kernels import gemv_s8_mosaic as s8
    from pallas_kernels.gemv_quant import gemv_quant

    if smoke:
        return row("s8: skipped in --smoke (Mosaic GPU's interpreter runs no WGMMA)")
    LOG.setdefault("s8", {})
    for name, n, k in [("wo", 4096, 4096), ("w13", 2 * 14336, 4096), ("w2", 4096, 14336)]:
        copies = max(4, min(24, int(0.6e9 // (n * k))))
        keys = jax.random.split(jax.random.key(3), copies + 5)
        x_codes = jax.random.randint(keys[-1], (k,), -127, 128, jnp.int32).astype(jnp.int8)
        x_scales = 0.01 * (1 + jax.random.uniform(keys[-2], (k // 32,)))
        q8 = [jax.random.randint(keys[c], (n, k), -127, 128, jnp.int32).astype(jnp.int8) for c in range(copies)]
        q4 = [lax.bitcast_convert_type(q, jnp.uint8)[:, : k // 2] for q in q8]  # Q4_0 bytes: any byte is two nibbles
        row_scale = 0.01 * (1 + jax.random.uniform(keys[-3], (n,)))
        group_scales = (0.01 * (1 + jax.random.uniform(keys[-4], (n, k // 32)))).astype(jnp.float16)
        refs = {"int8": s8.gemv_s8_reference(q8[0], row_scale, x_codes, x_scales),
                "int4": s8.gemv_s4_reference(q4[0], group_scales, x_codes, x_scales)}  # fmt: skip
        q4 = [jax.block_until_ready(s8.prepare_int4(q)) for q in q4]
        for fmt, q, nbytes in [("int8", q8, n * k), ("int4", q4, n * k * 18 // 32)]:
            tw, tx, _ = _gemv_inputs(n, k, {"int8_in": True}, copies, f"{fmt}_a8")
            fns = {"triton dp4a": (jax.jit(lambda ws, x: [gemv_quant(w, x) for w in ws]), (tw, tx))}
            kernel, scale = (s8.gemv_s8_mosaic, row_scale) if fmt == "int8" else (s8.gemv_s4_mosaic, group_scales)
            # 2 splits of K where N / 64 CTAs would leave SMs idle (their partial rows' add, by XLA, not timed)
            for st, sp in [(4, 1), (6, 1)] + ([(4, 2), (6, 2)] if n // 64 < 128 else []):
                fn = jax.jit(lambda qs, st=st, sp=sp, kernel=kernel, scale=scale: [
                    kernel(q, scale, x_codes, x_scales, stages=st, splits=sp) for q in qs])  # fmt: skip
                fns[f"mosaic s8 wgmma, {st} stages, {sp} split{'s' if sp > 1 else ''}"] = (fn, (q,))
            for label, (fn, args) in fns.items():
                out = jax.block_until_ready(fn(*args))[0]
                err = float(jnp.linalg.norm(out - refs[fmt]) / jnp.linalg.norm(refs[fmt]))
                err = None if label.startswith("triton") else err  # the Triton kernels have weights of their own
                us = _gemv_us(lambda: fn(*args), f"s8_{fmt}_{name}_{label}", copies, mean=True)
                gbs = nbytes / us / 1e3
                row(f"s8 {fmt} {name:4s} {n}x{k} {label:35s} {us:7.2f} us {gbs:5.0f} GB/s ({gbs / roof:4.0%} roof)"
                    + (f" err {err:.1e}" if err is not None else ""))
                LOG["s8"][f"{fmt} {name} {label}"] = [us, err]


def phase_pairs(smoke, roof, pairs=8, hidden=8192, dim=4096):
    """A chain of bf16 GEMV pairs x <- B (A x) (A hidden x dim, B dim x hidden): one persistent Mosaic kernel
    (gemv_pair_mosaic) against the Triton GEMV, one kernel a matrix; the span of a chain by CUPTI, a pair."""
    from pallas_kernels.gemv_pair_mosaic import arrange_pairs, gemv_pair_chain, gemv_pair_chain_reference

    if smoke:
        return row("pairs: skipped in --smoke (an interpreter running one program at a time passes no grid barrier)")
    ka, kb, kx = jax.random.split(jax.random.key(4), 3)
    a = (jax.random.normal(ka, (pairs, hidden, dim), jnp.float32) / np.sqrt(dim)).astype(jnp.bfloat16)
    b = (jax.random.normal(kb, (pairs, dim, hidden), jnp.float32) / np.sqrt(hidden)).astype(jnp.bfloat16)
    x = jax.random.normal(kx, (dim,), jnp.float32)
    ref = gemv_pair_chain_reference(a, b, x)
    a_list, b_list = [a[i] for i in range(pairs)], [b[i] for i in range(pairs)]
    w_pairs = jax.block_until_ready(jax.jit(arrange_pairs)(a, b))

    def triton_chain(a_list, b_list, x):
        ys, x = [], x.astype(jnp.bfloat16)
        for a_p, b_p in zip(a_list, b_list):
            x = gemv_mod.gemv(b_p, gemv_mod.gemv(a_p, x))
            ys.append(x)
        return jnp.stack(ys).astype(jnp.float32)

    fns = {"triton, 2 kernels a pair": (jax.jit(triton_chain), (a_list, b_list, x))}
    for st in (3, 4, 5):
        fns[f"mosaic pairs, {st} stages"] = (
            jax.jit(lambda w, x, st=st: gemv_pair_chain(w, x, stages=st)), (w_pairs, x))
    bytes_pair = 2 * hidden * dim * 2
    LOG.setdefault("pairs", {})
    for label, (fn, args) in fns.items():
        out = fn(*args)
        out = jax.block_until_ready(fn(*args))  # twice: the grid barrier's semaphores must be back at 0
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        us = _gemv_us(lambda: fn(*args), f"pairs_{label}", pairs)
        row(f"pairs {hidden}x{dim} {label:26s} {us:7.2f} us a pair (bytes at {roof:.0f} GB/s: "
            f"{bytes_pair / roof / 1e3:.2f}) err {err:.1e}")
        LOG["pairs"][label] = [us, err]


def _gemv_us(fn, label, per: int, mean: bool = False, runs: int = 5) -> float:
    """Median over `runs` traces of fn's GEMV kernels' GPU time (CUPTI), divided by `per`: the span from the
    first one's start to the last one's end, or with `mean` their summed durations."""
    from bench_gpu import gpu_kernel_events

    times = []
    for r in range(runs):
        trace = f"{label}_{r}".replace(" ", "_").replace(",", "")
        ks = [e for e in gpu_kernel_events(fn, trace, "/tmp/yalm_jax_traces") if "gemv" in e["name"]]
        span = max(e["ts"] + e["dur"] for e in ks) - min(e["ts"] for e in ks)
        times.append(sum(e["dur"] for e in ks) if mean else span)
    return statistics.median(times) / per


# -- attention -----------------------------------------------------------------------


def phase_attn(smoke, roof):
    from yalm_jax import ops

    if smoke:
        n_heads, n_kv, hd, t_max, layers = 8, 2, 32, 128, 2
        cfgs = [(16, 32, 4, 2)]
        lengths = [100]
    else:
        n_heads, n_kv, hd, t_max, layers = 32, 8, 128, 4096, 32
        cfgs = [(128, 512, 4, 2), (128, 256, 4, 2), (64, 1024, 4, 2), (128, 1024, 4, 2), (128, 512, 8, 2)]
        lengths = [128, 4096]
    dt = jnp.bfloat16
    keys = jax.random.split(jax.random.key(2), 2 * layers + 1)
    q = jax.random.normal(keys[-1], (n_heads, hd), dt)
    kcs = [jax.random.normal(keys[i], (n_kv, t_max, hd), dt) for i in range(layers)]
    vcs = [jax.random.normal(keys[layers + i], (n_kv, t_max, hd), dt) for i in range(layers)]
    LOG["attn"] = {}
    for length in lengths:
        kv_bytes = 2 * n_kv * length * hd * 2
        ref = attn_mod.decode_attention_reference(q, kcs[0], vcs[0], length)
        res = {}
        for cfg in cfgs:
            try:
                fn = jax.jit(
                    lambda q, kcs, vcs, n, cfg=cfg: [
                        attn_mod.decode_attention(q, k, v, n, config=cfg, interpret=smoke) for k, v in zip(kcs, vcs)
                    ]
                )
                out = fn(q, kcs, vcs, jnp.int32(length))[0]
                err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
                t, _ = timed(fn, q, kcs, vcs, jnp.int32(length), reps=3 if smoke else 10)
                res[cfg] = (t / layers, err)
                print(f"  attn T={length} {cfg}: {t / layers * 1e6:.1f} us err {err:.1e}")
            except Exception as e:  # noqa: BLE001
                print(f"  attn T={length} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
        # The xla path as the model runs it (attn_len = a power of two >= 256 covering the length).
        attn_len = min(t_max, max(256, 1 << (length - 1).bit_length()))
        pos = jnp.array([length - 1])
        kn = jax.random.normal(keys[1], (2 * n_kv, hd), dt)
        inv_freq = 1.0 / 10000.0 ** (np.arange(0, hd, 2, dtype=np.float32) / hd)
        qkv = jnp.concatenate([q, kn])  # the projection's rows: queries, new keys, new values
        fx = jax.jit(
            lambda qkv, kcs, vcs, pos: [
                ops.attention(
                    qkv.reshape(1, -1), k, v, pos, n_heads=n_heads, rope_inv_freq=inv_freq, attn_len=attn_len,
                    window=None, backend="xla",
                )[0]
                for k, v in zip(kcs, vcs)
            ]
        )  # fmt: skip
        tx, _ = timed(fx, qkv, kcs, vcs, pos, reps=3 if smoke else 10)
        tx /= layers
        # The fused form the model uses: rope, attend over slots < pos plus the new token, write it in place.
        fu = jax.jit(
            lambda qkv, kcs, vcs, p: [
                attn_mod.decode_attention_update(
                    qkv, k, v, p, n_heads=n_heads, rope_inv_freq=inv_freq, interpret=smoke
                )
                for k, v in zip(kcs, vcs)
            ],
            donate_argnums=(1, 2),
        )
        try:
            outs = fu(qkv, kcs, vcs, jnp.int32(length - 1))
            kcs = [o[1] for o in outs]
            vcs = [o[2] for o in outs]
            tu = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(3 if smoke else 10):
                    outs = fu(qkv, kcs, vcs, jnp.int32(length - 1))
                    kcs = [o[1] for o in outs]
                    vcs = [o[2] for o in outs]
                jax.block_until_ready(outs)
                tu.append((time.perf_counter() - t0) / (3 if smoke else 10) / layers)
            row(f"attn  T={length:5d} fused update (write in kernel, default cfg): {statistics.median(tu) * 1e6:6.1f} us")
        except Exception as e:  # noqa: BLE001
            row(f"attn  fused update FAILED {type(e).__name__}: {str(e)[:300]}")
        if res:
            b = min(res, key=lambda c: res[c][0])
            t, err = res[b]
            row(
                f"attn  T={length:5d} (cache {t_max}): pallas {t * 1e6:6.1f} us {kv_bytes / t / 1e9:5.0f} GB/s "
                f"cfg {b} err {err:.1e} | xla path (attn_len {attn_len}) {tx * 1e6:6.1f} us"
            )
            LOG["attn"][length] = {str(c): v for c, v in res.items()} | {"xla": tx, "best": b}
        else:
            row(f"attn  T={length}: every config failed | xla {tx * 1e6:.1f} us")


# -- the whole model -------------------------------------------------------------------


def mistral_cfg(smoke):
    from yalm_jax.config import ModelConfig

    if smoke:
        return ModelConfig(
            arch="mistral", vocab_size=64, dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
            head_dim=16, norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096, dtype="bfloat16",
        )  # fmt: skip
    return ModelConfig(
        arch="mistral", vocab_size=32000, dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768, dtype="bfloat16",
    )  # fmt: skip


def random_weights(cfg, key):
    from yalm_jax.weights import LayerWeights, Weights

    dt = jnp.dtype(cfg.dtype)
    keys = iter(jax.random.split(key, 8 * cfg.n_layers + 8))

    def w(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dt)

    def norm(n):
        return (1.0 + 0.1 * jax.random.normal(next(keys), (n,), jnp.float32)).astype(dt)

    layers = []
    for _ in range(cfg.n_layers):
        layers.append(
            LayerWeights(
                attn_norm=norm(cfg.dim), wqkv=w(cfg.q_dim + 2 * cfg.kv_dim, cfg.dim), bqkv=None,
                wo=w(cfg.dim, cfg.q_dim), ffn_norm=norm(cfg.dim), w13=w(2 * cfg.hidden_dim, cfg.dim),
                w2=w(cfg.dim, cfg.hidden_dim),
            )  # fmt: skip
        )
    return Weights(
        embed=w(cfg.vocab_size, cfg.dim, scale=1.0), layers=layers, final_norm=norm(cfg.dim),
        lm_head=w(cfg.vocab_size, cfg.dim),
    )  # fmt: skip


def random_cache(cfg, max_context, key):
    from yalm_jax.model import KVCache

    dt = jnp.dtype(cfg.dtype)
    shape = (cfg.n_kv_heads, max_context, cfg.head_dim)
    keys = jax.random.split(key, 2 * cfg.n_layers)
    ks = [jax.random.normal(keys[i], shape, jnp.float32).astype(dt) for i in range(cfg.n_layers)]
    vs = [jax.random.normal(keys[cfg.n_layers + i], shape, jnp.float32).astype(dt) for i in range(cfg.n_layers)]
    return KVCache(k=ks, v=vs)


def phase_model(smoke, roof, steps):
    import functools

    from yalm_jax import model

    cfg = mistral_cfg(smoke)
    weights = random_weights(cfg, jax.random.key(3))
    w_bytes = weights.nbytes() - weights.embed.nbytes + cfg.dim * 2  # the embedding: one row a token
    max_context = 256 if smoke else 4608
    contexts = [16, 128] if smoke else [128, 4096]
    LOG["model"] = {"weight_bytes_per_token": w_bytes}

    @functools.partial(jax.jit, static_argnames=("backend", "attn_len", "n"), donate_argnames=("cache",))
    def decode_n(weights, cache, tok, pos, *, backend, attn_len, n):
        def step(carry, _):
            cache, tok, pos = carry
            logits, cache = model.forward(
                weights, cache, tok[None], pos[None], cfg=cfg, attn_len=attn_len, backend=backend
            )
            nxt = jnp.argmax(logits[0]).astype(jnp.int32)
            return (cache, nxt, pos + 1), nxt

        (cache, tok, pos), toks = lax.scan(step, (cache, tok, pos), None, length=n)
        return cache, tok, pos, toks

    if not smoke:
        # The GEMVs alone, as the model issues them: what the step would cost with nothing else in it.
        def gemv_stream(weights, x):
            for ly in weights.layers:
                h = gemv_mod.gemv(ly.wqkv, x, norm=(ly.attn_norm, cfg.norm_eps))
                x = gemv_mod.gemv(ly.wo, h[: cfg.q_dim], residual=x)
                h = gemv_mod.gemv(ly.w13, x, norm=(ly.ffn_norm, cfg.norm_eps), gated=True)
                x = gemv_mod.gemv(ly.w2, h, residual=x)
            return gemv_mod.gemv(weights.output, x)

        fs = jax.jit(gemv_stream)
        x0 = jax.random.normal(jax.random.key(5), (cfg.dim,), jnp.bfloat16)
        t, _ = timed(fs, weights, x0, reps=10, batches=5)
        row(f"model GEMVs alone (5 x 32 + 1 kernels): {t * 1e3:.2f} ms/tok = {1 / t:.1f} tok/s, {w_bytes / t / 1e9:.0f} GB/s")
        LOG["model"]["gemv_only_s"] = t

    toks_by = {}
    for ctx in contexts:
        for backend in ("pallas", "xla"):
            if smoke and backend == "pallas":
                continue  # the interpreter is too slow for a whole model; tests cover it
            cache = random_cache(cfg, max_context, jax.random.key(4))
            reps = 3
            last = ctx + (reps + 1) * steps
            attn_len = max_context if backend == "pallas" else min(max_context, max(256, 1 << (last - 1).bit_length()))
            try:
                t0 = time.perf_counter()
                tok, pos = jnp.int32(1), jnp.int32(ctx)
                cache, tok, pos, toks = decode_n(weights, cache, tok, pos, backend=backend, attn_len=attn_len, n=steps)
                jax.block_until_ready(toks)
                compile_s = time.perf_counter() - t0
                toks_by[(ctx, backend)] = [int(t) for t in toks[:8]]
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    cache, tok, pos, toks = decode_n(
                        weights, cache, tok, pos, backend=backend, attn_len=attn_len, n=steps
                    )
                    jax.block_until_ready(toks)
                    ts.append(time.perf_counter() - t0)
                t = statistics.median(ts) / steps
                mid_ctx = ctx + 2.5 * steps
                kv_bytes = 2 * cfg.n_layers * cfg.kv_dim * mid_ctx * 2
                gbs = (w_bytes + kv_bytes) / t / 1e9
                row(
                    f"model ctx {ctx:5d} {backend:6s}: {1 / t:6.1f} tok/s  {t * 1e3:6.2f} ms/tok  {gbs:5.0f} GB/s "
                    f"({gbs / roof:4.0%} of {roof:.0f})  first call {compile_s:.0f} s"
                )
                LOG["model"][f"{ctx}_{backend}"] = {"s_per_tok": t, "runs": ts, "gbs": gbs, "compile_s": compile_s}
            except Exception as e:  # noqa: BLE001
                row(f"model ctx {ctx} {backend}: FAILED {type(e).__name__}: {str(e)[:400]}")
            del cache
    for ctx in contexts:
        a, b = toks_by.get((ctx, "pallas")), toks_by.get((ctx, "xla"))
        if a and b:
            row(f"model ctx {ctx}: first tokens pallas {a} xla {b} ({'same' if a == b else 'DIFFER'})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="roof,sweep,attn,model")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    phases = args.phases.split(",")
    print(f"jax {jax.__version__} devices {jax.devices()}")
    roof = 3026.0
    t_all = time.time()
    for ph in phases:
        t = time.time()
        try:
            if ph == "roof":
                roof = phase_roof(args.smoke)
            elif ph.startswith("sweep"):  # sweep[:format[:shapes]], e.g. sweep:int4, sweep:bfloat16:smollm2
                parts = ph.split(":")
                fmt = parts[1] if len(parts) > 1 else "bfloat16"
                phase_sweep(args.smoke, roof, fmt, parts[2] if len(parts) > 2 else "mistral")
            elif ph.startswith("mosaic"):  # mosaic[:shapes]
                parts = ph.split(":")
                phase_mosaic(args.smoke, roof, parts[1] if len(parts) > 1 else "mistral")
            elif ph == "s8":
                phase_s8(args.smoke, roof)
            elif ph == "pairs":
                phase_pairs(args.smoke, roof)
            elif ph == "overhead":
                phase_overhead(args.smoke, roof)
            elif ph == "attn":
                phase_attn(args.smoke, roof)
            elif ph == "model":
                phase_model(args.smoke, roof, args.steps)
        except Exception as e:  # noqa: BLE001
            row(f"{ph}: FAILED {type(e).__name__}: {str(e)[:500]}")
        print(f"[phase {ph}: {time.time() - t:.0f} s]")
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(LOG, f, indent=1, default=str)
    print(f"\n==== summary ({jax.devices()[0].device_kind}, {time.time() - t_all:.0f} s) ====")
    print("\n".join(ROWS))
    from pallas_kernels import gemv_quant

    print(f"gemv CONFIGS = {gemv_mod.CONFIGS}")
    print(f"gemv_quant CONFIGS = {gemv_quant.CONFIGS}")
    print(f"attention DEFAULT_CONFIG = {attn_mod.DEFAULT_CONFIG}")


if __name__ == "__main__":
    sys.exit(main())
