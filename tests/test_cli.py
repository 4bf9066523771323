"""scripts/generate.py end to end, as a subprocess on a tiny random model directory with a real tokenizer."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import hf_greedy  # noqa: E402

from yalm_jax.tokenizer import tokenizer_from_hf_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "generate.py")
PROMPT = "Once upon a time there was a little model"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["YALM_JAX_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("xla_cache"))
    e["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # on a GPU, pytest's own process already holds most memory
    return e


def _run(env, *args, stdin=None):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


def _ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def _eos(model_dir):
    return sorted(tokenizer_from_hf_dir(model_dir).eos_ids)


def test_completion_through_a_flagfile_matches_transformers_greedy(tiny_llama_chat_model, env, tmp_path):
    stats_path = tmp_path / "stats.json"
    flagfile = tmp_path / "greedy.flags"
    flagfile.write_text(f"--model={tiny_llama_chat_model}\n--mode=completion\n--temperature=0\n--max_new_tokens=32\n")
    proc = _ok(_run(env, f"--flagfile={flagfile}", f"--prompt={PROMPT}", f"--stats_json={stats_path}"))
    stats = json.loads(stats_path.read_text())
    tok = tokenizer_from_hf_dir(tiny_llama_chat_model)
    assert stats["prompt_token_ids"] == tok.encode(PROMPT)
    expected = hf_greedy(tiny_llama_chat_model, stats["prompt_token_ids"], 32, eos_ids=_eos(tiny_llama_chat_model))
    assert stats["generated_token_ids"] == expected
    assert proc.stdout == stats["text"] + "\n"
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "compile_s", "load_s"):
        assert isinstance(stats[key], float) and stats[key] >= 0, key
    assert stats["ttft_s"] > 0 and stats["load_s"] > 0
    assert "tok/s" in proc.stderr and "TTFT" in proc.stderr and "compile" in proc.stderr
    assert os.listdir(env["YALM_JAX_COMPILE_CACHE"])  # the persistent compile cache was written


def test_chat_prompt_applies_the_template(tiny_llama_chat_model, env, tmp_path):
    stats_path = tmp_path / "stats.json"
    args = [f"--model={tiny_llama_chat_model}", "--mode=chat", "--temperature=0", "--max_new_tokens=12"]
    _ok(_run(env, *args, "--prompt=Hello, how are you?", f"--stats_json={stats_path}"))
    stats = json.loads(stats_path.read_text())
    tok = tokenizer_from_hf_dir(tiny_llama_chat_model)
    rendered = tok.render_chat([{"role": "user", "content": "Hello, how are you?"}])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert stats["prompt_token_ids"] == tok.encode(rendered, add_special_tokens=False)
    expected = hf_greedy(tiny_llama_chat_model, stats["prompt_token_ids"], 12, eos_ids=_eos(tiny_llama_chat_model))
    assert stats["generated_token_ids"] == expected


def test_interactive_chat_keeps_the_conversation_and_cache(tiny_llama_chat_model, env, tmp_path):
    stats_path = tmp_path / "stats.json"
    args = [f"--model={tiny_llama_chat_model}", "--mode=chat", "--temperature=0", "--max_new_tokens=8"]
    proc = _ok(_run(env, *args, f"--stats_json={stats_path}", stdin="Hello there\nWhat is the sky?\n/exit\nignored\n"))
    turns = json.loads(stats_path.read_text())["turns"]
    assert len(turns) == 2
    assert proc.stdout == "".join(t["text"] + "\n" for t in turns)
    first, second = turns
    assert second["prompt_token_ids"][: len(first["prompt_token_ids"])] == first["prompt_token_ids"]
    assert second["prefilled_tokens"] < second["prompt_tokens"]  # the first turn stayed in the KV cache
    tok = tokenizer_from_hf_dir(tiny_llama_chat_model)
    conversation = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first["text"]},
        {"role": "user", "content": "What is the sky?"},
    ]
    assert second["prompt_token_ids"] == tok.encode(tok.render_chat(conversation), add_special_tokens=False)
    expected = hf_greedy(tiny_llama_chat_model, second["prompt_token_ids"], 8, eos_ids=_eos(tiny_llama_chat_model))
    assert second["generated_token_ids"] == expected


def test_interactive_chat_on_a_terminal(tiny_llama_chat_model, env, tmp_path):
    # README's chat as a person runs it: stdin and stdout a terminal, so the REPL prompts with "> " and warms
    # its programs up while the first line is typed. (It once died at its first prompt there, while every
    # piped run passed.) The replies must be the greedy ones, with the warm-up's throwaway prompts forgotten;
    # Ctrl-C at the prompt leaves, as /exit does.
    import pty
    import select
    import signal
    import time

    stats_path = tmp_path / "stats.json"
    args = [f"--model={tiny_llama_chat_model}", "--mode=chat", "--temperature=0", "--max_new_tokens=8"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *args, f"--stats_json={stats_path}"], stdin=slave, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    seen = b""

    def read_until_prompt(count):
        nonlocal seen
        deadline = time.time() + 300
        while seen.count(b"> ") < count and time.time() < deadline and proc.poll() is None:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child has closed the terminal
                    break
        return seen.count(b"> ") >= count

    try:
        assert read_until_prompt(1), seen.decode(errors="replace")
        time.sleep(1.0)  # typing, while the warm-up runs
        os.write(master, b"Hello there\n")
        assert read_until_prompt(2), seen.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, seen.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    (turn,) = json.loads(stats_path.read_text())["turns"]
    assert turn["text"] and turn["text"] in seen.decode(errors="replace").replace("\r\n", "\n")
    expected = hf_greedy(tiny_llama_chat_model, turn["prompt_token_ids"], 8, eos_ids=_eos(tiny_llama_chat_model))
    assert turn["generated_token_ids"] == expected
    assert turn["prefilled_tokens"] == turn["prompt_tokens"]  # nothing of the warm-up's prompts was reused


def test_a_reader_that_left_ends_the_run_quietly(tiny_llama_chat_model, env):
    # `generate.py ... | head -c 20`: the pipe's reader is gone before the first token is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run(
        [sys.executable, SCRIPT, f"--model={tiny_llama_chat_model}", f"--prompt={PROMPT}", "--max_new_tokens=8"],
        stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=300,
    )  # fmt: skip
    os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def test_chat_line_ending_in_a_backslash_continues_the_message(tiny_llama_chat_model, env, tmp_path):
    stats_path = tmp_path / "stats.json"
    args = [f"--model={tiny_llama_chat_model}", "--mode=chat", "--temperature=0", "--max_new_tokens=4"]
    _ok(_run(env, *args, f"--stats_json={stats_path}", stdin="Tell me\\\nabout the sky\n/exit\n"))
    (turn,) = json.loads(stats_path.read_text())["turns"]
    tok = tokenizer_from_hf_dir(tiny_llama_chat_model)
    message = [{"role": "user", "content": "Tell me\nabout the sky"}]
    assert turn["prompt_token_ids"] == tok.encode(tok.render_chat(message), add_special_tokens=False)


def _assert_usage_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "flag, needle",
    [
        ("--max_new_tokens=-1", "max_new_tokens"),
        ("--top_p=0", "top_p"),
        ("--top_p=1.5", "top_p"),
        ("--temperature=-0.5", "temperature"),
        ("--top_k=-3", "top_k"),
        ("--min_p=1.5", "min_p"),
        ("--min_p=-0.1", "min_p"),
        ("--max_context=0", "max_context"),
        ("--dtype=int4", "dtype"),
        ("--mode=story", "mode"),
        ("--no_such_flag", "no_such_flag"),
        ("--flagfile=/nonexistent/x.flags", "flagfile"),
    ],
)
def test_invalid_flags_exit_2_with_one_line(env, flag, needle):
    _assert_usage_error(_run(env, flag, "--prompt=hi"), needle)


def test_bad_models_and_prompts_exit_2_with_one_line(tiny_llama_chat_model, env, tmp_path):
    _assert_usage_error(_run(env, f"--model={tmp_path}/missing", "--prompt=hi"), "missing")

    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(2048))
    _assert_usage_error(_run(env, f"--model={corrupt}", "--prompt=hi"), "corrupt.gguf")

    bad_arch = tmp_path / "bad_arch"
    shutil.copytree(tiny_llama_chat_model, bad_arch)
    cfg = json.loads((bad_arch / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (bad_arch / "config.json").write_text(json.dumps(cfg))
    _assert_usage_error(_run(env, f"--model={bad_arch}", "--prompt=hi"), "unsupported architecture")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_llama_chat_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _assert_usage_error(_run(env, f"--model={truncated}", "--prompt=hi"), "model.safetensors")

    _assert_usage_error(
        _run(env, f"--model={tiny_llama_chat_model}", "--max_context=8", f"--prompt={PROMPT} {PROMPT}"), "context"
    )
    # A prompt on stdin that is not UTF-8 (a Latin-1 "café"), under a UTF-8 locale and under C's.
    for lang in ("C.UTF-8", "C"):
        proc = subprocess.run(
            [sys.executable, SCRIPT, f"--model={tiny_llama_chat_model}", "--max_new_tokens=4"],
            input="café au lait".encode("latin-1"), capture_output=True, env={**env, "LANG": lang, "LC_ALL": lang},
            timeout=300,
        )  # fmt: skip
        _assert_usage_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr.decode()), "UTF-8")
    # Dense weights leave no matrix for --int8_activations.
    _assert_usage_error(
        _run(env, f"--model={tiny_llama_chat_model}", "--quant=none", "--int8_activations", "--prompt=hi"),
        "--int8_activations",
    )


def test_unsupported_gguf_quant_exits_2(env, tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from test_gguf import spm_vocab, write_gguf

    # A complete one-layer llama (dim 32, 2 heads of 16, 1 kv head, hidden 256) whose ffn_down is a tensor of
    # integers (I8), a type with no dequantization.
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (len(spm_vocab()[0]), 32),
        "output_norm.weight": (32,),
        "blk.0.attn_norm.weight": (32,),
        "blk.0.attn_q.weight": (32, 32),
        "blk.0.attn_k.weight": (16, 32),
        "blk.0.attn_v.weight": (16, 32),
        "blk.0.attn_output.weight": (32, 32),
        "blk.0.ffn_norm.weight": (32,),
        "blk.0.ffn_gate.weight": (256, 32),
        "blk.0.ffn_up.weight": (256, 32),
    }
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    ints = rng.integers(-100, 100, (32, 256), dtype=np.int8)
    tensors["blk.0.ffn_down.weight"] = (ints, gguf.GGMLQuantizationType.I8)
    path = write_gguf(tmp_path / "unsupported.gguf", tensors, hp={"hidden": 256})
    _assert_usage_error(_run(env, f"--model={path}", "--prompt=hi"), "I8")
