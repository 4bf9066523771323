"""Batch-1 decode speed at tensor parallelism tp=N against tp=1, on random weights of a real model's shape.

  python scripts/bench_tp.py --shape=mistral7b --tp=1,2            # Mistral-7B-shaped bf16
  python scripts/bench_tp.py --shape=mixtral8x7b --tp=2            # Mixtral-8x7B-shaped bf16 (93 GB)
  python scripts/bench_tp.py --shape=mistral7b --tp=1,2 --quant=int4_a8   # int4 projections, int8 activations
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python scripts/bench_tp.py --shape=toy --tp=1,2  # CPU smoke

Each device generates only its own shards of the dense weights (jit with out_shardings),
so a model larger than one device never exists whole anywhere (--quant's matrices are
drawn whole, one at a time, and split as the loader splits them). Prints tok/s and
the bytes each device reads per token (its shard of the weights, the top-k
experts' share for Mixtral, plus its part of the KV cache) as GB/s. With
--profile_dir (a GPU), one more chunk runs under the profiler and each device's
kernels a step are summed: count, busy time and span (span - busy: the time its
compute stream waits, on the all-reduces' latency among others).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from yalm_jax import generate as gen
from yalm_jax import model, parallel, quant
from yalm_jax.config import ModelConfig
from yalm_jax.sampling import SamplingParams
from yalm_jax.weights import LayerWeights, Weights

SHAPES = {
    "mistral7b": dict(arch="mistral", vocab_size=32000, dim=4096, hidden_dim=14336, n_layers=32, n_heads=32,
                      n_kv_heads=8, head_dim=128),
    "mixtral8x7b": dict(arch="mixtral", vocab_size=32000, dim=4096, hidden_dim=14336, n_layers=32, n_heads=32,
                        n_kv_heads=8, head_dim=128, n_experts=8, n_experts_per_tok=2),
    "toy": dict(arch="mistral", vocab_size=256, dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=16),
    "toy_moe": dict(arch="mixtral", vocab_size=256, dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=16, n_experts=4, n_experts_per_tok=2),
}  # fmt: skip


def make_cfg(shape: str, dtype: str, tp: int, layers: int | None = None) -> ModelConfig:
    dims = SHAPES[shape] | ({"n_layers": layers} if layers else {})
    return ModelConfig(norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768, dtype=dtype, tp=tp, **dims)


def random_weights(cfg: ModelConfig, seed: int = 0, quant_fmt: str | None = None) -> Weights:
    """Random weights in cfg's layout, each device drawing only its shards. With `quant_fmt` (one of
    bench_gpu.random_quantized's formats, `_a8` for int8 activations) the projections and the output matrix are
    quantized instead, drawn whole and split by the library's own placement (parallel.place)."""
    dt = jnp.dtype(cfg.dtype)
    key = iter(jax.random.split(jax.random.key(seed), 16 * cfg.n_layers + 8))
    kv_rows = 2 * parallel.cache_heads(cfg) * cfg.head_dim  # k and v rows, with any replicated kv heads
    quant_seeds = itertools.count(seed * 10_000)

    def quantized(field, shape):
        from bench_gpu import random_quantized

        host = jax.device_get(random_quantized(shape, quant_fmt.removesuffix("_a8"), next(quant_seeds)))
        return parallel.place(cfg, field, quant.with_int8_activations(host) if quant_fmt.endswith("_a8") else host)

    def w(field, *shape, norm=False):
        if quant_fmt and field in ("wqkv", "wo", "w13", "w2", "lm_head") and len(shape) == 2:
            return quantized(field, shape)

        def draw(k):
            x = jax.random.normal(k, shape, jnp.float32)
            return (1.0 + 0.1 * x if norm else x * shape[-1] ** -0.5).astype(dt)

        out = NamedSharding(parallel.mesh(cfg.tp), parallel.spec(cfg, field, len(shape)))
        return jax.jit(draw, out_shardings=out)(next(key))

    e = (cfg.n_experts,) if cfg.is_moe else ()
    layers = [
        LayerWeights(
            attn_norm=w("attn_norm", cfg.dim, norm=True), wqkv=w("wqkv", cfg.q_dim + kv_rows, cfg.dim), bqkv=None,
            wo=w("wo", cfg.dim, cfg.q_dim), ffn_norm=w("ffn_norm", cfg.dim, norm=True),
            w13=w("w13", *e, 2 * cfg.hidden_dim, cfg.dim), w2=w("w2", *e, cfg.dim, cfg.hidden_dim),
            router=w("router", cfg.n_experts, cfg.dim) if cfg.is_moe else None,
        )  # fmt: skip
        for _ in range(cfg.n_layers)
    ]
    return jax.block_until_ready(
        Weights(embed=w("embed", cfg.vocab_size, cfg.dim), layers=layers, final_norm=w("final_norm", cfg.dim, norm=True),
                lm_head=w("lm_head", cfg.vocab_size, cfg.dim))
    )  # fmt: skip


def bytes_read_per_device(weights: Weights, cfg: ModelConfig, pos: int) -> float:
    """Bytes one device reads per decode token: its weights (the chosen experts only) and its KV cache slots."""
    per_dev = max(parallel.per_device_bytes(weights).values())
    embed = weights.embed.addressable_shards[0].data.nbytes
    total = per_dev - embed  # one embedding row: nothing
    if cfg.is_moe:
        expert = sum(l.w13.addressable_shards[0].data.nbytes + l.w2.addressable_shards[0].data.nbytes for l in weights.layers)
        total -= expert * (1 - cfg.n_experts_per_tok / cfg.n_experts)
    kv = 2 * cfg.n_layers * parallel.cache_heads(cfg) // cfg.tp * cfg.head_dim * pos * jnp.dtype(cfg.dtype).itemsize
    return total + kv


def kernel_time_per_device(fn, n_steps: int, label: str, trace_dir: str) -> list[dict] | dict:
    """fn() under the profiler: bench_gpu.summarize_kernels' figures a step for each device (the trace's GPU
    processes), or the profiler's error."""
    from bench_gpu import gpu_kernel_events, summarize_kernels

    events = gpu_kernel_events(fn, label, trace_dir)
    if isinstance(events, dict):
        return events
    per_device = {}
    for e in events:
        per_device.setdefault(e["pid"], []).append(e)
    return [summarize_kernels(kern, n_steps) for _, kern in sorted(per_device.items())]


def bench(shape: str, dtype: str, tp: int, backend: str, ctx: int, n_steps: int, reps: int, layers=None,
          profile_dir: str | None = None, quant_fmt: str | None = None) -> dict:  # fmt: skip
    cfg = make_cfg(shape, dtype, tp, layers)
    parallel.check(cfg, tp)
    weights = random_weights(cfg, quant_fmt=quant_fmt)
    # Room for the warm-up, the reps and a profiled chunk, in the slots the CLI would give it.
    cache = model.init_cache(cfg, gen.cache_slots(ctx + n_steps * (reps + 2) + 1)[0])
    state = gen.DecodeState(
        cache=cache, token=jnp.asarray(1, jnp.int32), pos=jnp.asarray(ctx, jnp.int32), key=jax.random.key(0),
        done=jnp.asarray(False),
    )  # fmt: skip
    stop = jnp.asarray([-1], jnp.int32)
    attn_len = gen.attn_bucket(ctx + n_steps * (reps + 2), cache.max_context)
    run = gen.decode_chunk  # jitted, the state donated
    kw = dict(cfg=cfg, n_steps=n_steps, attn_len=attn_len, backend=backend)
    tokens, state = run(weights, state, SamplingParams.greedy(), stop, **kw)  # compile + warm up
    jax.block_until_ready(tokens)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        tokens, state = run(weights, state, SamplingParams.greedy(), stop, **kw)
        jax.block_until_ready(tokens)
        times.append(time.perf_counter() - t)
    s = statistics.median(times) / n_steps
    read = bytes_read_per_device(weights, cfg, ctx + n_steps * reps // 2)
    profile = None
    if profile_dir:
        box = [state]

        def chunk():
            tokens, box[0] = run(weights, box[0], SamplingParams.greedy(), stop, **kw)
            return tokens

        profile = kernel_time_per_device(chunk, n_steps, f"{shape}_tp{tp}", profile_dir)
    return {"shape": shape, "layers": cfg.n_layers, "dtype": dtype, "quant": quant_fmt, "tp": tp, "backend": backend, "ctx": ctx, "tok_s": 1 / s,
            "ms_per_tok": s * 1e3, "gb_per_device_per_tok": read / 1e9, "gb_s_per_device": read / s / 1e9,
            "device": jax.devices()[0].device_kind, "per_device_step": profile}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="mistral7b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp", default="1,2", help="comma-separated tp values, run in turn")
    ap.add_argument("--backend", default=None, choices=["xla", "pallas"])
    ap.add_argument("--ctx", type=int, default=128, help="position of the first decoded token")
    ap.add_argument("--n_steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer layers than the shape has, to time a model larger than one device on one (tok/s scales ~1/layers)")
    ap.add_argument("--quant", default=None, help="random quantized projections: int8, int4, fp8_e4m3, int8_g32, "
                    "int4_min, int4_zp, iq4 (bench_gpu.FORMS), each with an optional _a8 (int8 activations)")
    ap.add_argument("--profile_dir", default=None, help="GPU: profile one more chunk, traces here (see the docstring)")
    ap.add_argument("--json_out", default=None)
    args = ap.parse_args()
    from yalm_jax import ops

    rows = []
    for tp in [int(t) for t in args.tp.split(",")]:
        r = bench(args.shape, args.dtype, tp, args.backend or ops.default_backend(), args.ctx, args.n_steps, args.reps,
                  args.layers, args.profile_dir, args.quant)  # fmt: skip
        rows.append(r)
        print(f"{r['shape']} ({r['layers']} layers) {r['quant'] or r['dtype']} tp={tp} {r['backend']}: {r['tok_s']:.1f} tok/s, {r['ms_per_tok']:.2f} ms/tok, "
              f"{r['gb_s_per_device']:.0f} GB/s per device ({r['gb_per_device_per_tok']:.2f} GB/tok each) on {r['device']}",
              flush=True)  # fmt: skip
        profile = r["per_device_step"]
        if isinstance(profile, dict):  # the profiler's error
            print(f"  profile: {profile}")
        for i, d in enumerate(profile if isinstance(profile, list) else []):
            print(f"  device {i}, a step: {d['kernels_per_step']:.0f} kernels, busy {d['busy_us_per_step']:.0f} us, "
                  f"span {d['span_us_per_step']:.0f} us")
            for t in d["top"][:8]:
                print(f"    {t['per_step']:5.1f} x {t['mean_us']:7.2f} us  {t['name'][:80]}")
        jax.clear_caches()
    if len(rows) > 1:
        print(f"speed-up tp={rows[-1]['tp']} vs tp={rows[0]['tp']}: {rows[-1]['tok_s'] / rows[0]['tok_s']:.2f}x")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
