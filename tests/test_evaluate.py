"""yalm_jax.evaluate: perplexity in sliding windows (vs transformers on SmolLM2), and the passkey test."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest

from yalm_jax import evaluate
from yalm_jax.errors import UserError
from yalm_jax.generate import Generator
from yalm_jax.loading import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, "data", "alice_ch1.txt")


def test_eval_windows_walk_the_text_as_transformers_guide_does():
    # begin, end, first scored token: each window scores what the last one did not, the text's first token never.
    assert evaluate.eval_windows(600, 256, 128) == [(0, 256, 1), (128, 384, 256), (256, 512, 384), (384, 600, 512)]
    assert evaluate.eval_windows(100, 256, 128) == [(0, 100, 1)]
    # stride == context: no overlap, and each window's first token has no context, so it is not scored.
    assert evaluate.eval_windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    with pytest.raises(UserError):
        evaluate.eval_windows(10, 4, 5)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(smollm2_gguf, "float32")


@pytest.fixture(scope="module")
def alice_ids(smollm2):
    with open(TEXT, encoding="utf-8") as f:
        return smollm2.tokenizer.encode(f.read())


def test_shipped_text_is_a_few_thousand_tokens(alice_ids):
    assert 2000 < len(alice_ids) and os.path.getsize(TEXT) < 100_000


def _hf_perplexity(hf_model, ids, context, stride):
    import torch

    total, count = 0.0, 0
    for begin, end, first in evaluate.eval_windows(len(ids), context, stride):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids[begin:end]])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1)
        nll = -logp.gather(1, torch.tensor(ids[begin + 1 : end])[:, None])[:, 0]
        total += float(nll[first - begin - 1 :].sum())
        count += end - first
    return math.exp(total / count), count


def test_smollm2_perplexity_matches_transformers(smollm2_gguf, smollm2, alice_ids):
    """The same windows (256 tokens every 128) over the first 600 tokens of the shipped text, within 0.1%."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging

    logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    ).eval()
    ids = alice_ids[:600]
    want, count = _hf_perplexity(hf, ids, 256, 128)
    got = evaluate.perplexity(smollm2.weights, smollm2.cfg, ids, context=256, stride=128)
    assert got.tokens == count == 599 and got.windows == 4
    assert abs(got.perplexity / want - 1) < 1e-3, (got.perplexity, want)
    assert 2 < got.perplexity < 50  # a real model on English prose


def test_passkey_prompt_and_answer_parsing():
    prompt = evaluate.passkey_prompt(4242, 2, 3)
    filler = evaluate.PASSKEY_FILLER
    assert prompt == " ".join(
        [evaluate.PASSKEY_INTRO, filler, filler, "The pass key is 4242. Remember it. 4242 is the pass key.", filler,
         "What is the pass key? The pass key is"]
    )  # fmt: skip
    assert evaluate.passkey_prompt(7, 3, 3).endswith("The pass key is 7. Remember it. 7 is the pass key. " + evaluate.PASSKEY_QUESTION)
    assert evaluate.parse_answer(" 4242. Remember it.") == 4242
    assert evaluate.parse_answer(" 42 is the key, not 4242") == 42
    assert evaluate.parse_answer(" hidden in the text.") is None
    with pytest.raises(UserError):
        evaluate.passkey_prompt(1, 4, 3)


def test_junk_lines_fill_the_context(smollm2):
    n = evaluate.junk_lines_for(smollm2.tokenizer, 1024)
    used = len(smollm2.tokenizer.encode(evaluate.passkey_prompt(49999, n // 2, n)))
    assert 1024 - 64 <= used <= 1024 - 8, used


def test_smollm2_finds_the_passkey_at_short_context(smollm2):
    g = Generator(smollm2.weights, smollm2.cfg, smollm2.tokenizer, max_context=512)
    lines = evaluate.junk_lines_for(smollm2.tokenizer, 512)
    results = [evaluate.passkey(g, junk_lines=lines, seed=seed) for seed in (0, 1)]
    for r in results:
        assert r.prompt_tokens <= 512 - 8 and 0 <= r.pos <= lines and 0 < r.key < 50000
        assert r.found and r.answer == r.key, r
    # A planted answer that differs from the key is reported as not found.
    assert results[0].key != results[1].key
    miss = evaluate.PasskeyResult(**{**results[0].__dict__, "answer": results[1].key, "found": False})
    assert not miss.found and 0 <= miss.depth <= 1
    assert np.isclose(results[0].depth, results[0].key_token / results[0].prompt_tokens)


# ---- the CLI modes (scripts/generate.py --mode=perplexity|passkey) ----------------------------

SCRIPT = os.path.join(ROOT, "scripts", "generate.py")


def _cli(tmp_path, *args):
    import json
    import subprocess
    import sys

    env = {**os.environ, "YALM_JAX_COMPILE_CACHE": "off", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    stats = tmp_path / "stats.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args, f"--stats_json={stats}"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(stats.read_text())


@pytest.mark.parametrize("ring", [False, True])
def test_cli_perplexity_writes_the_library_figure(tiny_llama_chat_model, tmp_path, ring):
    text = tmp_path / "text.txt"
    with open(TEXT, encoding="utf-8") as f:
        text.write_text(f.read()[:600])
    flags = ["--max_context=512", "--window=64", "--sinks=2"] if ring else ["--max_context=64", "--stride=16"]
    out, stats = _cli(tmp_path, f"--model={tiny_llama_chat_model}", "--mode=perplexity", f"--text_file={text}", *flags)
    lm = load_model(tiny_llama_chat_model)
    ids = lm.tokenizer.encode(text.read_text())
    kw = {"context": 512, "window": 64, "sinks": 2} if ring else {"context": 64, "stride": 16}
    want = evaluate.perplexity(lm.weights, lm.cfg, ids, **kw)
    # The same figure as the library's, to float noise: on a GPU two processes may autotune XLA's kernels apart
    # (an H100 printed 858.3699 where the library gave 858.3698).
    assert re.fullmatch(r"perplexity: \d+\.\d{4}\n", out)
    assert np.isclose(float(out.split()[1]), want.perplexity, rtol=1e-6, atol=1e-4)
    assert np.isclose(stats["perplexity"], want.perplexity, rtol=1e-6) and stats["tokens"] == want.tokens
    assert stats["tokens"] == len(ids) - 1 and stats["windows"] == (1 if ring else -(-(len(ids) - 64) // 16) + 1)
    assert len(ids) > (4 * 64 if ring else 64)
    assert (stats["window"], stats["sinks"]) == ((64, 2) if ring else (64, None))


def test_cli_passkey_reports_the_key_and_its_place(tiny_llama_chat_model, tmp_path):
    """The CLI's line and stats agree with each other (SmolLM2 finding it is checked above, through the library)."""
    args = [f"--model={tiny_llama_chat_model}", "--mode=passkey", "--max_context=1024", "--junk_lines=4", "--passkey_pos=2"]
    out, stats = _cli(tmp_path, *args, "--seed=7")
    verdict = "found" if stats["found"] else "not found"
    assert out.startswith(f"passkey: {verdict} (key {stats['key']} after filler line 2 of 4, token {stats['key_token']} of ")
    assert stats["found"] == (stats["answer"] == stats["key"]) and (stats["pos"], stats["junk_lines"]) == (2, 4)
    assert stats["key"] == evaluate.passkey(
        Generator(*_tiny(tiny_llama_chat_model), max_context=1024), junk_lines=4, pos=2, seed=7
    ).key  # the same seed draws the same key


def _tiny(model_dir):
    lm = load_model(model_dir)
    return lm.weights, lm.cfg, lm.tokenizer
