"""Generation through the library API: greedy output equals transformers', sessions reuse their cache exactly, stops."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import hf_greedy  # noqa: E402

from yalm_jax import generate as gen  # noqa: E402
from yalm_jax.errors import UserError  # noqa: E402
from yalm_jax.loading import load_model  # noqa: E402
from yalm_jax.sampling import SamplingParams  # noqa: E402

PROMPT = "Once upon a time there was a little model. The user asked a question and"
N_NEW = 32


def _generator(model_dir, max_context=128, **kwargs):
    lm = load_model(model_dir)
    return gen.Generator(lm.weights, lm.cfg, lm.tokenizer, max_context=max_context, **kwargs), lm.tokenizer


def test_greedy_matches_transformers(tiny_chat_model, monkeypatch):
    # Small chunks and attention buckets, so one generation crosses chunk and bucket edges.
    monkeypatch.setattr(gen, "MIN_ATTN_LEN", 16)
    g, tok = _generator(tiny_chat_model, prefill_chunk=16, decode_chunk=8)
    tok.eos_ids = frozenset()  # run all 32 tokens, as transformers does below with no eos
    prompt = tok.encode(PROMPT)
    assert len(prompt) > 16
    out = g.generate(prompt, max_new_tokens=N_NEW)
    assert out.token_ids == hf_greedy(tiny_chat_model, prompt, N_NEW)
    assert out.finish_reason == "length" and out.prefilled == len(prompt)
    assert out.text == tok.decode(out.token_ids)


def test_xla_cache_holds_the_attention_bucket_it_needs(tiny_chat_model, monkeypatch):
    # On the XLA path the cache grows by attention buckets (XLA copies any part of it that attention reads
    # short of the whole), and a new sequence starts small again; the kernels' cache keeps every slot.
    monkeypatch.setattr(gen, "MIN_ATTN_LEN", 16)
    g, tok = _generator(tiny_chat_model, backend="xla", prefill_chunk=16, decode_chunk=4)
    tok.eos_ids = frozenset()
    prompt = tok.encode(PROMPT)
    assert g.cache.max_context == 16
    long = g.generate(prompt, max_new_tokens=24)
    assert g.cache.max_context == gen.attn_bucket(len(prompt) + 24, 128) < 128
    assert long.token_ids == hf_greedy(tiny_chat_model, prompt, 24)
    other = [t for t in tok.encode("Two words") if t != prompt[0]]
    short = g.generate(other, max_new_tokens=4)
    assert short.prefilled == len(other) and g.cache.max_context == 16
    assert short.token_ids == hf_greedy(tiny_chat_model, other, 4)
    kernels, _ = _generator(tiny_chat_model, backend="pallas")
    assert kernels.cache.max_context == 128


def test_chat_session_continuation_equals_one_shot_prefill(tiny_llama_chat_model):
    g, tok = _generator(tiny_llama_chat_model)
    session = gen.ChatSession(g, system="You are a model.")
    session.send("Hello, how are you today?", max_new_tokens=8)
    out2 = session.send("What is the capital of France?", max_new_tokens=8)
    assert out2.prefilled < len(out2.prompt_ids)  # the first turn came from the cache
    assert session.messages[-1] == {"role": "assistant", "content": out2.text}

    fresh, _ = _generator(tiny_llama_chat_model)
    one_shot = fresh.generate(out2.prompt_ids, max_new_tokens=8)
    assert one_shot.prefilled == len(out2.prompt_ids)
    assert one_shot.token_ids == out2.token_ids


def test_chunk_queued_past_a_stop_leaves_the_reused_cache_intact(tiny_llama_chat_model):
    # With 4-step chunks the next chunk is already queued when a stop string ends a turn mid-generation;
    # its cache writes must not disturb the prefix the next turn reuses.
    turn = "Hello, how are you today?"
    probe, tok = _generator(tiny_llama_chat_model, decode_chunk=4)
    tok.eos_ids = frozenset()
    full = gen.ChatSession(probe, system="You are a model.").send(turn, max_new_tokens=16)
    cut = len(tok.decode(full.token_ids[:9]))  # a stop string inside the third chunk
    stop = full.text[cut : cut + 2]
    assert len(stop) == 2 and full.text.find(stop) >= len(tok.decode(full.token_ids[:4]))

    g, tok = _generator(tiny_llama_chat_model, decode_chunk=4)
    tok.eos_ids = frozenset()
    session = gen.ChatSession(g, system="You are a model.")
    assert session.send(turn, max_new_tokens=16, stop=[stop]).finish_reason == "stop"
    out2 = session.send("What is the capital of France?", max_new_tokens=12)
    assert out2.prefilled < len(out2.prompt_ids)
    fresh, _ = _generator(tiny_llama_chat_model, decode_chunk=4)
    assert fresh.generate(out2.prompt_ids, max_new_tokens=12).token_ids == out2.token_ids


def test_decode_chunk_past_a_stop_token_moves_only_the_key(tiny_llama_chat_model):
    # A chunk whose third token is a stop token against the same chunk cut after that token: the same tokens
    # (then -1), position and token, the same cache below the stop token's slot; the key moved on once a step,
    # run or not. (The CPU skips those steps; a GPU runs them idle, writing the stop token's slot, which no
    # one reads. Both forms pass here.)
    import jax
    import jax.numpy as jnp
    import numpy as np

    g, tok = _generator(tiny_llama_chat_model)
    prompt = tok.encode(PROMPT)
    sampling = SamplingParams.make(0.9, 20, 0.95, 0.0)
    logits, cache = gen.prefill(g.weights, g._new_cache(), prompt, 0, g.cfg, chunk=g.prefill_chunk)
    key0 = jax.random.key(np.random.default_rng().integers(1 << 30))
    first, key = gen.first_token(logits, key0, sampling)

    attn_len = gen.attn_bucket(len(prompt) + 8, g.slots)

    def chunk(n_steps, stop_ids):  # each from copies: the chunk donates its state
        state = gen.DecodeState(
            cache=jax.tree.map(jnp.copy, cache), token=jnp.copy(first), pos=jnp.asarray(len(prompt), jnp.int32),
            key=jax.random.clone(key), done=jnp.asarray(False),
        )  # fmt: skip
        stop_ids = jnp.asarray(stop_ids, jnp.int32)
        return gen.decode_chunk(
            g.weights, state, sampling, stop_ids, cfg=g.cfg, n_steps=n_steps, attn_len=attn_len, backend=g.backend
        )

    free, _ = chunk(8, [-1])
    stop = int(free[2])
    assert stop not in np.asarray(free[:2])  # else the stop would come earlier
    tokens, state = chunk(8, [stop])
    cut_tokens, cut = chunk(3, [-1])
    assert np.asarray(tokens).tolist() == np.asarray(cut_tokens).tolist() + [-1] * 5
    assert bool(state.done) and int(state.pos) == int(cut.pos) and int(state.token) == int(cut.token) == stop
    fed = int(cut.pos)  # slots below hold the prompt and the fed tokens
    for a, b in zip(state.cache.k + state.cache.v, cut.cache.k + cut.cache.v):
        np.testing.assert_array_equal(np.asarray(a)[:, :fed], np.asarray(b)[:, :fed])
    moved = key
    for _ in range(8):
        moved = jax.random.split(moved)[0]
    np.testing.assert_array_equal(jax.random.key_data(state.key), jax.random.key_data(moved))


def test_interrupted_reply_leaves_the_session_as_before(tiny_llama_chat_model):
    # Ctrl-C in a chat reply (KeyboardInterrupt out of the text callback, mid-decode, a chunk queued ahead): the
    # turn is left out, and the next turn's reply is the one a session that never saw it gives.
    g, tok = _generator(tiny_llama_chat_model)
    tok.eos_ids = frozenset()
    session = gen.ChatSession(g, system="You are a model.")
    session.send("Hello, how are you today?", max_new_tokens=8)
    history = list(session.messages)
    pieces = []

    def interrupt(text):
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.send("Tell me a long story.", max_new_tokens=64, on_text=interrupt)
    assert session.messages == history
    after = session.send("What is the sky?", max_new_tokens=8)

    fresh_g, fresh_tok = _generator(tiny_llama_chat_model)
    fresh_tok.eos_ids = frozenset()
    fresh = gen.ChatSession(fresh_g)
    fresh.messages = list(history)
    assert after.token_ids == fresh.send("What is the sky?", max_new_tokens=8).token_ids


def test_stop_string_truncates_text_and_stream(tiny_llama_chat_model):
    g, tok = _generator(tiny_llama_chat_model)
    tok.eos_ids = frozenset()
    prompt = tok.encode(PROMPT)
    full = g.generate(prompt, max_new_tokens=24).text
    assert len(full) >= 8
    stop = full[4:7]
    pieces = []
    out = g.generate(prompt, max_new_tokens=24, stop=["never appears \x00", stop], on_text=pieces.append)
    assert out.finish_reason == "stop"
    assert out.text == full[: full.find(stop)]
    assert "".join(pieces) == out.text
    assert out.prefilled == 1  # the whole prompt but its last token was cached by the first call


def test_eos_stops_and_is_kept_in_ids_not_text(tiny_llama_chat_model):
    g, tok = _generator(tiny_llama_chat_model)
    tok.eos_ids = frozenset()
    prompt = tok.encode(PROMPT)
    ids = g.generate(prompt, max_new_tokens=16).token_ids
    eos = ids[5]
    tok.eos_ids = frozenset({eos})
    out = g.generate(prompt, max_new_tokens=16)
    cut = ids.index(eos) + 1
    assert out.finish_reason == "eos"
    assert out.token_ids == ids[:cut]
    assert out.text == tok.decode(ids[: cut - 1])

    # The decode loop ended on the device at the EOS; the cache it left must serve the next call exactly.
    follow = prompt + out.token_ids + tok.encode(" and then")
    again = g.generate(follow, max_new_tokens=8)
    assert again.prefilled == len(follow) - len(prompt) - cut + 1  # prompt and reply (bar the EOS) were cached
    fresh, fresh_tok = _generator(tiny_llama_chat_model)
    fresh_tok.eos_ids = frozenset({eos})
    assert fresh.generate(follow, max_new_tokens=8).token_ids == again.token_ids


def test_full_context_stops_and_long_prompt_is_a_user_error(tiny_llama_chat_model):
    g, tok = _generator(tiny_llama_chat_model, max_context=40)
    assert (g.slots, g.ring_sinks) == (48, None)  # rounded up for the attention kernels; sequences still stop at 40
    tok.eos_ids = frozenset()
    prompt = tok.encode(PROMPT)
    out = g.generate(prompt, max_new_tokens=100)
    assert out.finish_reason == "context" and len(prompt) + len(out.token_ids) == 40
    with pytest.raises(UserError, match="context"):
        g.generate(tok.encode(PROMPT * 3), max_new_tokens=4)
    with pytest.raises(UserError):
        g.generate([], max_new_tokens=4)


def test_cache_slots_align_a_flat_cache_and_keep_a_ring_as_asked():
    assert gen.cache_slots(1000) == (1008, None)
    assert gen.cache_slots(4096, 4096) == (4096, None)
    assert gen.cache_slots(4096, 250, 4) == (250, 4)  # a ring's length is its window: never rounded
    with pytest.raises(UserError, match="sinks"):
        gen.cache_slots(4096, 256, 256)


def test_sampling_is_reproducible_per_seed(tiny_llama_chat_model):
    params = SamplingParams.make(temperature=1.0, top_k=50, top_p=0.9)
    runs = []
    for seed in (3, 3, 4):
        g, tok = _generator(tiny_llama_chat_model, seed=seed)
        tok.eos_ids = frozenset()
        runs.append(g.generate(tok.encode(PROMPT), max_new_tokens=16, sampling=params).token_ids)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_compile_cache_dir_and_off_switch(monkeypatch, tmp_path):
    from yalm_jax import compile_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == str(tmp_path / "yalm_jax" / "xla")
    for off in ("off", "0", ""):
        monkeypatch.setenv(compile_cache.ENV_VAR, off)
        assert compile_cache.enable() is None


def test_compile_time_excludes_work_queued_on_the_arguments():
    # The compile waits for its arguments, so wall time minus compile time keeps the queued work's time
    # (the decode's reported speed: Generator subtracts compile time from its wall clock).
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def slow(m):  # long enough to still be running when the next call is compiled
        return jax.lax.fori_loop(0, 40, lambda i, a: jnp.tanh(a @ m), m)[:1, :8]

    @jax.jit
    def many_ops(v):  # enough distinct ops that compiling takes a while
        for i in range(100):
            v = jnp.sin(v * (i + 1)) + v[::-1] * 1e-3
        return v

    m = jnp.asarray(np.random.default_rng().standard_normal((1024, 1024)) / 32, jnp.float32)
    jax.block_until_ready(slow(m))
    t = time.perf_counter()
    jax.block_until_ready(slow(m))
    slow_s = time.perf_counter() - t

    programs = gen.Programs()
    t = time.perf_counter()
    out = programs(many_ops, slow(m))  # `slow` dispatched, still running as the call begins
    jax.block_until_ready(out)
    wall = time.perf_counter() - t
    assert programs.compile_s > 0.3 * slow_s  # else the check below cannot tell overlap from none
    assert wall - programs.compile_s >= 0.7 * slow_s


def test_warm_up_compiles_a_reply_and_changes_nothing(tiny_llama_chat_model):
    # After warm_up for the prompt's padded length, the reply compiles nothing, and it is the reply a generator
    # without warm-up samples from the same seed (the cache and the sampling key are left as they were).
    import threading

    sampling = SamplingParams.make(0.9, 20, 0.95, 0.0)
    g, tok = _generator(tiny_llama_chat_model, seed=7)
    tok.eos_ids = frozenset()
    prompt = tok.encode(PROMPT)
    fresh, fresh_tok = _generator(tiny_llama_chat_model, seed=7)
    fresh_tok.eos_ids = frozenset()
    want = fresh.generate(prompt, max_new_tokens=N_NEW, sampling=sampling)

    cancelled = threading.Event()
    cancelled.set()
    g.warm_up([gen.padded_length(len(prompt), g.prefill_chunk)], sampling=sampling, cancel=cancelled)
    assert g.programs.compile_s == 0  # cancelled: not one compile or run
    g.warm_up([gen.padded_length(len(prompt), g.prefill_chunk)], sampling=sampling)
    assert g.programs.compile_s > 0 and g.cached_ids == []
    out = g.generate(prompt, max_new_tokens=N_NEW, sampling=sampling)
    assert out.compile_s == 0
    assert out.token_ids == want.token_ids and len(set(out.token_ids)) > 1
