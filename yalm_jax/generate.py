"""Generation: chunked prefill, on-device decode chunks, and chat sessions that keep their cache.

The device side is pure functions that other JAX code can call, jit or scan
as they are (`decode_step` is the unjitted step; the others are jitted):

* `prefill_chunk` runs a fixed-size chunk of prompt tokens into the cache and
  returns the logits of one row (the last real token);
* `decode_step` feeds one token, samples the next and returns the new
  `DecodeState` (cache, newest token, its position, rng key);
* `decode_chunk` runs `n_steps` decode steps in one `lax.scan` on the device,
  so the host sees a chunk of tokens per dispatch; steps after a stop token
  yield -1 and change nothing.

`prefill_chunk` and `decode_chunk` donate the cache, and `first_token`
samples from the prefill logits. Attention reads only `attn_len` cache
slots, a power of two >= 256 (capped at the cache size) that covers the last
position of the call, so a short conversation does not read all of an
8192-slot cache per token, and the number of compiled programs grows with the
logarithm of the context.

The host side is `prefill` (splits a prompt into chunks) and `Generator`,
which keeps one KV cache together with the token ids it holds: each call
reuses the longest common prefix of its prompt and those ids and prefills only
the rest. `ChatSession` builds on it to keep a conversation, so each turn
prefills only its new tokens. Programs are compiled ahead of time per shape
(`Programs`), which keeps compile time out of the reported speeds.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from yalm_jax import model, ops
from yalm_jax.config import ModelConfig
from yalm_jax.errors import UserError
from yalm_jax.model import KVCache
from yalm_jax.sampling import SamplingParams, sample
from yalm_jax.weights import Weights

PREFILL_CHUNK = 128  # prompt tokens per prefill call; a shorter last chunk is padded to a power of two >= 16
PREFILL_CHUNK_GPU = 512  # on a GPU: 1.8x the prefill speed of 128-token chunks (H100, Mistral-7B shape: BENCHMARKS.md)
MIN_PREFILL_CHUNK = 16
DECODE_CHUNK = 16  # decode steps per device call
# On the CPU: the same decode speed in f32 (61-63 tok/s, SmolLM2; int8 2% slower), the text streamed every ~70 ms
# where 16 steps showed it in bursts ~280 ms apart (BENCHMARKS.md, CPU).
DECODE_CHUNK_CPU = 4
MIN_ATTN_LEN = 256
# The Pallas attention kernels tile the cache in multiples of this many slots; a cache of any other length
# runs XLA's attention instead (Mistral-7B's decode 7% slower a token on one H200: BENCHMARKS.md, run 18).
CACHE_ALIGN = 16


def default_prefill_chunk() -> int:
    """Prompt tokens per prefill call on the default backend: larger on a GPU, where a chunk's matrix products
    run near the tensor cores' rate only with enough rows."""
    return PREFILL_CHUNK_GPU if jax.default_backend() == "gpu" else PREFILL_CHUNK


def default_decode_chunk() -> int:
    """Decode steps per device call on the default backend: fewer on the CPU, whose steps are long enough that
    a call's own cost does not show and a reply's text then comes in smaller pieces."""
    return DECODE_CHUNK_CPU if jax.default_backend() == "cpu" else DECODE_CHUNK


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def attn_bucket(needed: int, max_context: int) -> int:
    """The attention length for a call whose last position is `needed - 1`."""
    return min(max(MIN_ATTN_LEN, _next_pow2(needed)), max_context)


def cache_slots(max_context: int, window: int | None = None, sinks: int = 2) -> tuple[int, int | None]:
    """The KV cache's slots and ring sinks for sequences of up to `max_context` positions: a ring of `window`
    slots keeping `sinks` first tokens when `window` < max_context, else max_context rounded up to
    CACHE_ALIGN (no position reaches the slots past it, which attention never reads)."""
    if window is not None and window < max_context:
        if not 0 <= sinks < window:
            raise UserError(f"sinks must be in [0, window={window}), got {sinks}")
        return window, sinks
    return -(-max_context // CACHE_ALIGN) * CACHE_ALIGN, None


# -- device side -------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: KVCache
    token: jax.Array  # int32 (): the newest token, not yet written to the cache
    pos: jax.Array  # int32 (): the position of `token`
    key: jax.Array  # PRNG key for the next draws
    done: jax.Array  # bool (): `token` is a stop token, so `decode_chunk` runs no further steps


@functools.partial(jax.jit, static_argnames=("cfg", "attn_len", "backend"), donate_argnames=("cache",))
def prefill_chunk(
    weights: Weights,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    last: jax.Array,
    *,
    cfg: ModelConfig,
    attn_len: int,
    backend: str = "xla",
) -> tuple[jax.Array, KVCache]:
    """Writes `tokens` (C,) at `positions` (C,) into the cache; returns the f32 logits (V,) of row `last`.

    Positions are consecutive and end within the cache; padding rows continue
    them, so their keys land in slots past the real tokens that nothing reads
    before a real token overwrites them. Only the one row's logits are computed.
    """
    h, cache = model.forward_hidden(weights, cache, tokens, positions, cfg=cfg, attn_len=attn_len, backend=backend)
    row = lax.dynamic_slice_in_dim(h, last, 1, axis=0)
    return model.logits_from_hidden(weights, row, cfg=cfg, backend=backend)[0], cache


def decode_step(
    weights: Weights, state: DecodeState, params: SamplingParams, *, cfg: ModelConfig, attn_len: int, backend: str = "xla"
) -> tuple[DecodeState, jax.Array]:
    """Feeds `state.token`, samples the next token; returns the new state and that token. Pure."""
    h, cache = model.forward_hidden(
        weights, state.cache, state.token[None], state.pos[None], cfg=cfg, attn_len=attn_len, backend=backend
    )
    logits = model.logits_from_hidden(weights, h, cfg=cfg, backend=backend)[0]
    key, sub = jax.random.split(state.key)
    token = sample(logits, sub, params)
    return dataclasses.replace(state, cache=cache, token=token, pos=state.pos + 1, key=key), token


@functools.partial(
    jax.jit, static_argnames=("cfg", "n_steps", "attn_len", "backend"), donate_argnames=("state",)
)
def decode_chunk(
    weights: Weights,
    state: DecodeState,
    params: SamplingParams,
    stop_ids: jax.Array,
    *,
    cfg: ModelConfig,
    n_steps: int,
    attn_len: int,
    backend: str = "xla",
) -> tuple[jax.Array, DecodeState]:
    """`n_steps` decode steps in one `lax.scan` on the device: the sampled tokens (n_steps,) int32 and the new state.

    Once a token in `stop_ids` (E,) is sampled, the remaining steps yield -1
    and leave the state as it was but for the key, which moves on as if they
    ran: on a GPU they feed the stop token at its position (writing its cache
    slot, past the tokens fed, which nothing reads); on the CPU they are skipped.
    Every position fed, up to `state.pos + n_steps - 1`, must lie within the
    cache and below `attn_len`.
    """

    def step(s: DecodeState, _):
        new, token = decode_step(weights, s, params, cfg=cfg, attn_len=attn_len, backend=backend)
        token = jnp.where(s.done, -1, token)
        keep = lambda old, fresh: jnp.where(s.done, old, fresh)  # noqa: E731
        s = DecodeState(
            cache=new.cache,
            token=keep(s.token, new.token),
            pos=keep(s.pos, new.pos),
            key=new.key,
            done=s.done | jnp.any(token == stop_ids),
        )
        return s, token

    def every_step(state):
        return lax.scan(step, state, None, length=n_steps)

    def until_stop(state):
        def step_unless_done(s: DecodeState, _):
            # A loop of one step, or none once a stop token came: XLA keeps a loop's state in place, where a
            # lax.cond here copied the cache every step (3.5x slower decode).
            def more(carry):
                s, _, ran = carry
                return ~ran & ~s.done

            def one(carry):
                s, _, _ = carry
                s, token = step(s, None)
                return s, token, True

            next_key = jax.random.split(s.key)[0]  # what a step makes its key, run or idle (decode_step)
            s, token, _ = lax.while_loop(more, one, (s, jnp.int32(-1), False))
            return dataclasses.replace(s, key=next_key), token

        return lax.scan(step_unless_done, state, None, length=n_steps)

    # The CPU skips the steps after a stop token, so a reply's last chunk, and the one queued after it, cost
    # nothing past it (a short chat reply 0.58 -> 0.19 s, decode speed unchanged); XLA GPU would read the inner
    # loop's condition back to the host every step, so a GPU runs every step, those past the stop idling.
    state, tokens = (until_stop if jax.default_backend() == "cpu" else every_step)(state)
    return tokens, state


@jax.jit
def first_token(logits: jax.Array, key: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Samples from the prefill logits; returns the token and the next key."""
    key, sub = jax.random.split(key)
    return sample(logits, sub, params), key


# -- compiled programs ---------------------------------------------------------------


class Interrupted(Exception):
    """A `Programs` call refused because its `interrupt` was set."""


class Programs:
    """Ahead-of-time compiled executables, one per jitted function and shape, and the time spent compiling.

    The first call of a shape is lowered and compiled here (or loaded from the
    persistent cache) before it runs, so timing a call never includes compiling it:
    callers subtract `compile_s` from their wall time. While `interrupt` is set, a
    compile or a run raises Interrupted instead (Generator.warm_up's cancel).
    """

    def __init__(self):
        self._exe: dict = {}
        self.compile_s = 0.0
        self.interrupt: threading.Event | None = None

    def _check_interrupt(self):
        if self.interrupt is not None and self.interrupt.is_set():
            raise Interrupted

    def get(self, fn, *args, **static):
        leaves, tree = jax.tree_util.tree_flatten(args)
        sig = (fn, tree, tuple((x.shape, x.dtype, _placement(x)) for x in leaves), tuple(sorted(static.items())))
        exe = self._exe.get(sig)
        if exe is None:
            # Work still queued on the arguments (the decode chunk before, dispatched ahead) would run during
            # the compile, and subtracting the compile time would then drop that work's time as well: a first
            # reply's decode read 211 tok/s where SmolLM2 on this CPU runs 62.
            jax.block_until_ready(args)
            self._check_interrupt()
            t = time.perf_counter()
            exe = fn.lower(*args, **static).compile()
            self.compile_s += time.perf_counter() - t
            self._exe[sig] = exe
        return exe

    def __call__(self, fn, *args, **static):
        exe = self.get(fn, *args, **static)
        self._check_interrupt()
        return exe(*args)


def _placement(x):
    """How a multi-device (tensor-parallel) array is split; None on one device, where it never matters."""
    sharding = getattr(x, "sharding", None)
    return sharding if sharding is not None and len(sharding.device_set) > 1 else None


def padded_length(n: int, chunk: int) -> int:
    """The length a prefill call of n prompt tokens runs at (the last, or only, chunk's; before the cache's end)."""
    return chunk if n >= chunk else min(chunk, max(MIN_PREFILL_CHUNK, _next_pow2(n)))


def _plan_prefill(
    start: int, end: int, chunk: int, max_context: int, ring_sinks: int | None = None
) -> list[tuple[int, int, int]]:
    """(first position, real tokens, padded length) for each prefill call over positions [start, end).

    A short last chunk is padded to a power of two, but never past the cache's end.
    In a ring cache (`ring_sinks` set) a chunk that would reach past the ring's
    first lap is neither padded (padding would overwrite live slots) nor wraps:
    it is cut to the largest power of two that fits before the ring's end.
    """
    plan = []
    while start < end:
        n = min(chunk, end - start)
        length = padded_length(n, chunk)
        if ring_sinks is not None and start + length > max_context:
            slot = start if start < ring_sinks else ring_sinks + (start - ring_sinks) % (max_context - ring_sinks)
            n = length = 1 << (min(n, max_context - slot).bit_length() - 1)
        else:
            length = min(length, max_context - start)
        plan.append((start, n, length))
        start += n
    return plan


def _chunk_args(tokens: Sequence[int], start: int, n: int, length: int):
    """Token ids, positions and last-row index of one chunk; pads continue the positions (see model.forward)."""
    ids = np.zeros(length, np.int32)
    ids[:n] = tokens[start : start + n]
    positions = np.arange(start, start + length, dtype=np.int32)
    return jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(n - 1, jnp.int32)


def prefill(
    weights: Weights,
    cache: KVCache,
    tokens: Sequence[int],
    start_pos: int,
    cfg: ModelConfig,
    *,
    chunk: int = PREFILL_CHUNK,
    backend: str = "xla",
    programs: Programs | None = None,
) -> tuple[jax.Array, KVCache]:
    """Writes `tokens[start_pos:]` at their positions in chunks; returns the last token's logits and the cache.

    `tokens` is the whole sequence; slots before `start_pos` must already hold
    `tokens[:start_pos]`. The cache is consumed (donated).
    """
    max_context = cache.max_context
    if not 0 <= start_pos < len(tokens) <= (max_context if cache.ring_sinks is None else len(tokens)):
        raise ValueError(f"need 0 <= start_pos ({start_pos}) < len(tokens) ({len(tokens)}) <= {max_context}")
    run = programs or (lambda fn, *args, **static: fn(*args, **static))
    logits = None
    for start, n, length in _plan_prefill(start_pos, len(tokens), chunk, max_context, cache.ring_sinks):
        ids, positions, last = _chunk_args(tokens, start, n, length)
        attn_len = attn_bucket(start + n, max_context)
        logits, cache = run(
            prefill_chunk, weights, cache, ids, positions, last, cfg=cfg, attn_len=attn_len, backend=backend
        )
    return logits, cache


# -- host side -------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
    """One call's result. `token_ids` includes an EOS token if one ended it; `text` never shows it."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos", "stop" (a stop string), "length" (max_new_tokens) or "context" (cache full)
    prefilled: int  # prompt tokens actually run (the rest were already in the cache)
    prefill_s: float
    ttft_s: float  # prefill plus the first token, compile time excluded
    decode_s: float  # everything after the first token, compile time excluded
    compile_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def stats(self) -> dict:
        return {
            "prompt_tokens": len(self.prompt_ids),
            "prefilled_tokens": self.prefilled,
            "generated_tokens": len(self.token_ids),
            "finish_reason": self.finish_reason,
            "prefill_s": self.prefill_s,
            "prefill_tok_s": self.prefill_tok_s,
            "ttft_s": self.ttft_s,
            "decode_s": self.decode_s,
            "decode_tok_s": self.decode_tok_s,
            "compile_s": self.compile_s,
        }


class _TextStream:
    """Streams decoded text, holding back any tail that could still become a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], on_text: Callable[[str], None] | None):
        self._decoder = tokenizer.stream_decoder()
        self._stop = [s for s in stop if s]
        self._on_text = on_text
        self.text = ""
        self._sent = 0

    def push(self, token: int) -> bool:
        """Adds a token's text; True when a stop string appeared (the text is then cut before it)."""
        self.text += self._decoder.push([token])
        return self._check()

    def finish(self) -> None:
        self.text += self._decoder.flush()
        self._check()
        self._send(len(self.text))

    def _check(self) -> bool:
        # A stop string can only start in the held-back tail or the new text.
        start = max(0, self._sent - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self._send(len(self.text))
            return True
        held = max((k for s in self._stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._send(len(self.text) - held)
        return False

    def _send(self, upto: int) -> None:
        if upto > self._sent and self._on_text is not None:
            self._on_text(self.text[self._sent : upto])
        self._sent = max(self._sent, upto)


class Generator:
    """A model, one KV cache, and the token ids the cache holds (slot i holds `cached_ids[i]`).

    With `window` below `max_context`, the cache is a ring of `window` slots with
    `sinks` attention sinks (StreamingLLM, see model.KVCache): a sequence may run
    to max_context positions while attention sees the sinks and the last tokens.
    `backend` defaults to the device's (ops.default_backend: the Pallas kernels on a GPU), as generate.py's.
    """

    def __init__(
        self,
        weights: Weights,
        cfg: ModelConfig,
        tokenizer,
        *,
        max_context: int,
        backend: str | None = None,
        seed: int = 0,
        prefill_chunk: int | None = None,
        decode_chunk: int | None = None,
        window: int | None = None,
        sinks: int = 2,
        kv_dtype: str | None = None,
    ):
        if max_context < 1:
            raise UserError(f"max_context must be >= 1, got {max_context}")
        self.weights, self.cfg, self.tokenizer = weights, cfg, tokenizer
        self.max_context = max_context
        self.slots, self.ring_sinks = cache_slots(max_context, window, sinks)
        self.backend = backend or ops.default_backend()
        self.kv_dtype = kv_dtype  # the KV cache's dtype (default: the compute dtype); attention upcasts
        self.prefill_chunk = prefill_chunk or default_prefill_chunk()
        self.decode_chunk = decode_chunk or default_decode_chunk()
        # XLA's attention reads the cache's first attn_len slots, which it copies on every step unless they are
        # the whole cache (SmolLM2 decoding on a CPU at context 900: 23 -> 28 tok/s without the copy), so on that
        # path the cache holds one attention bucket's slots and grows with the sequence; the kernels read it in
        # place. A ring keeps its slots.
        self.grows = self.backend == "xla" and self.ring_sinks is None
        self.cache: KVCache | None = self._new_cache()
        self.cached_ids: list[int] = []
        self.key = jax.random.key(seed)
        self.programs = Programs()

    def _new_cache(self) -> KVCache:
        slots = attn_bucket(1, self.slots) if self.grows else self.slots
        return model.init_cache(self.cfg, slots, self.kv_dtype, ring_sinks=self.ring_sinks)

    def _fitted(self, cache: KVCache, slots: int) -> KVCache:
        """`cache`, on a growing generator grown to `slots` slots (an attention bucket)."""
        if not self.grows or slots <= cache.max_context:
            return cache
        return self.programs(model.grow_cache, cache, slots=slots)

    def reset(self) -> None:
        self.cached_ids = []

    def warm_up(
        self,
        prompt_lengths: Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Compiles, and runs once, what a reply to a prompt of each length needs (its prefill, its first
        token, a decode chunk), on throwaway tokens; the cache holds nothing of them after, and the sampling
        key is as before, so replies are what they would have been. A program's first run costs more than
        its next ones (XLA CPU sets up its matrix products then: ~0.3 s a prefill program), so an interactive
        chat calls this while its first message is typed. `cancel` stops it before its next compile or run."""
        key, decoded = self.key, False
        self.programs.interrupt = cancel
        try:
            for n in prompt_lengths:
                if n + self.decode_chunk >= self.max_context:
                    continue
                self.reset()
                # One prompt also runs a decode chunk: every length's reply shares that program.
                new_tokens = 1 if decoded else self.decode_chunk + 1
                decoded = len(self.generate([0] * n, max_new_tokens=new_tokens, sampling=sampling).token_ids) > 1
        except Interrupted:
            pass  # a cache it had taken is dropped; the next call makes a new one
        finally:
            self.programs.interrupt = None
            self.reset()
            self.key = key

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise UserError(
                f"the prompt is {len(prompt_ids)} tokens but the context holds {self.max_context} "
                "(room for at least one new token is needed); shorten it or raise --max_context"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the model's vocabulary of {self.cfg.vocab_size}")

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Continues `prompt_ids` (the whole sequence, including any earlier turns) and streams text to `on_text`.

        Stops at an EOS / end-of-turn id, a stop string (the text is cut before
        it), `max_new_tokens`, or a full context (prompt plus output reach `max_context`).
        """
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_prompt(prompt_ids)
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        sampling = sampling or SamplingParams.greedy()
        eos = self.tokenizer.eos_ids
        compile_before = self.programs.compile_s
        n_prompt = len(prompt_ids)

        # Reuse the cached prefix; the last prompt token always runs, for its logits.
        reuse = 0
        for a, b in zip(self.cached_ids, prompt_ids[:-1]):
            if a != b:
                break
            reuse += 1
        if len(self.cached_ids) > self.slots and reuse < len(self.cached_ids):
            reuse = 0  # the ring has wrapped: only the slots' newest contents are left, none of them before `reuse`
        if self.cache is None or (self.grows and reuse == 0):  # an earlier call failed after donating it, or
            self.cache = self._new_cache()  # a new sequence starts in a cache of the size it needs
        cache, self.cache = self.cache, None  # donated below; a failure leaves the generator without a cache
        self.cached_ids = []
        cache = self._fitted(cache, attn_bucket(n_prompt, self.slots))
        plan = _plan_prefill(reuse, n_prompt, self.prefill_chunk, cache.max_context, self.ring_sinks)
        for start, n, length in plan:  # compile before timing
            args = _chunk_args(prompt_ids, start, n, length)
            exe = self.programs.get(
                prefill_chunk, self.weights, cache, *args,
                cfg=self.cfg, attn_len=attn_bucket(start + n, cache.max_context), backend=self.backend,
            )  # fmt: skip
        logits = jnp.zeros(self.cfg.vocab_size, jnp.float32, device=exe.output_shardings[0])
        self.programs.get(first_token, logits, self.key, sampling)

        t0 = time.perf_counter()
        logits, cache = prefill(
            self.weights, cache, prompt_ids, reuse, self.cfg,
            chunk=self.prefill_chunk, backend=self.backend, programs=self.programs,
        )  # fmt: skip
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - t0
        token, self.key = self.programs(first_token, logits, self.key, sampling)
        all_ids = [int(token)]  # every sampled token, including any past the stop
        ttft_s = time.perf_counter() - t0

        stream = _TextStream(self.tokenizer, stop, on_text)
        kept, reason = self._accept(all_ids[0], [], stream, eos, n_prompt, max_new_tokens)
        fed = 0  # sampled tokens written to the cache
        stop_ids = jnp.asarray(sorted(eos) or [-1], jnp.int32)
        # The chunks donate their state; the key goes in as a copy, so a call interrupted mid-decode (Ctrl-C in
        # a chat) leaves the generator a live key. (Its cache is dropped then; the next call makes a new one.)
        state = DecodeState(
            cache=cache, token=token, pos=jnp.asarray(n_prompt, jnp.int32), key=jax.random.clone(self.key),
            done=jnp.asarray(False),
        )
        t1 = time.perf_counter()
        compile_mid = self.programs.compile_s
        limit = min(max_new_tokens, self.max_context - n_prompt)  # tokens this call may keep

        def queue_chunk(state, n_kept, n_fed):
            """Dispatches (asynchronously) the decode chunk that follows n_kept kept and n_fed fed tokens;
            None once the call has no room left."""
            room = limit - n_kept
            if room <= 0:
                return None
            # A power of two keeps the number of compiled chunk sizes small, unless it would run past the cache.
            n_steps = min(self.decode_chunk, _next_pow2(room))
            if n_prompt + n_fed + n_steps > self.max_context:
                n_steps = room
            attn_len = attn_bucket(n_prompt + n_fed + n_steps, self.slots)
            state = dataclasses.replace(state, cache=self._fitted(state.cache, attn_len))
            tokens, state = self.programs(
                decode_chunk, self.weights, state, sampling, stop_ids,
                cfg=self.cfg, n_steps=n_steps, attn_len=attn_len, backend=self.backend,
            )  # fmt: skip
            return tokens, state, n_steps

        # The next chunk is queued before this one's tokens are read, so the device does not wait on the
        # host between chunks. If this chunk ends the call, the next one's tokens are dropped and its cache
        # writes sit past the kept tokens, in slots nothing reads; a ring cache has no such slots (they
        # hold the window), so it runs one chunk at a time.
        ahead = self.ring_sinks is None
        chunk = queue_chunk(state, len(kept), fed) if reason is None else None
        while chunk is not None:
            tokens, state, n_steps = chunk
            chunk = queue_chunk(state, len(kept) + n_steps, fed + n_steps) if ahead else None
            if chunk is not None:
                state = chunk[1]  # this chunk's state was donated to the next one, which carries it on
            tokens = np.asarray(tokens)
            fed += int(np.count_nonzero(tokens >= 0))  # steps run; each wrote the token it was fed
            for t in tokens.tolist():
                all_ids.append(t)
                kept, reason = self._accept(t, kept, stream, eos, n_prompt, max_new_tokens)
                if reason is not None:
                    break
            if reason is not None:
                break
            if not ahead:
                chunk = queue_chunk(state, len(kept), fed)
        decode_s = time.perf_counter() - t1 - (self.programs.compile_s - compile_mid)
        stream.finish()

        self.cache, self.key = state.cache, state.key
        self.cached_ids = (prompt_ids + all_ids[:fed])[: self.max_context]
        return Generation(
            prompt_ids=prompt_ids,
            token_ids=kept,
            text=stream.text,
            finish_reason=reason,
            prefilled=n_prompt - reuse,
            prefill_s=prefill_s,
            ttft_s=ttft_s,
            decode_s=decode_s,
            compile_s=self.programs.compile_s - compile_before,
        )

    def _accept(self, token, kept, stream, eos, n_prompt, max_new_tokens):
        """Appends one sampled token; returns the kept tokens and the finish reason, if this ends the call."""
        if len(kept) >= max_new_tokens:
            return kept, "length"
        kept.append(token)
        if token in eos:
            return kept, "eos"
        if stream.push(token):
            return kept, "stop"
        if len(kept) >= max_new_tokens:
            return kept, "length"
        if n_prompt + len(kept) >= self.max_context:
            return kept, "context"
        return kept, None


class ChatSession:
    """A conversation with one model; each turn prefills only what the cache does not hold yet."""

    def __init__(self, generator: Generator, system: str | None = None):
        self.generator = generator
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def prompt_ids(self) -> list[int]:
        tok = self.generator.tokenizer
        # The template writes any BOS itself, as transformers' apply_chat_template does.
        return tok.encode(tok.render_chat(self.messages, add_generation_prompt=True), add_special_tokens=False)

    def send(self, text: str, **generate_kwargs) -> Generation:
        """Adds a user turn, generates the reply, and adds it to the conversation; a turn that fails or is
        interrupted (Ctrl-C) is left out of it."""
        self.messages.append({"role": "user", "content": text})
        try:
            result = self.generator.generate(self.prompt_ids(), **generate_kwargs)
        except (UserError, KeyboardInterrupt):
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": result.text})
        return result
