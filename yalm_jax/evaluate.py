"""yalm's evaluation modes as library functions: perplexity over a text, and the passkey test.

`perplexity` scores a token sequence with the model's logits. A text longer
than the context is scored in sliding windows, as transformers' perplexity
guide does: windows of `context` tokens start every `stride` tokens, each from
an empty cache, and each scores only the tokens that no earlier window scored,
conditioned on up to context - stride earlier tokens. The first token of the
text, and of any window that starts on a token not yet scored, has nothing to
condition on and is not scored. With `window` below `context` the cache is a
ring of `window` slots with attention sinks (model.KVCache), so each window
streams through positions past the cache, as long-context generation does.

`passkey` hides a number in lines of filler (the prompt of llama.cpp's and
yalm's passkey examples), asks for it, and checks the greedy answer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from yalm_jax import generate as gen
from yalm_jax import model
from yalm_jax.config import ModelConfig
from yalm_jax.errors import UserError
from yalm_jax.weights import Weights

# -- perplexity ------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "attn_len", "backend"), donate_argnames=("cache",))
def score_chunk(
    weights: Weights,
    cache: model.KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    targets: jax.Array,
    *,
    cfg: ModelConfig,
    attn_len: int,
    backend: str = "xla",
) -> tuple[jax.Array, model.KVCache]:
    """Runs a chunk like generate.prefill_chunk; returns -log p(targets[i] | tokens up to row i), (S,) f32."""
    h, cache = model.forward_hidden(weights, cache, tokens, positions, cfg=cfg, attn_len=attn_len, backend=backend)
    logits = model.logits_from_hidden(weights, h, cfg=cfg, backend=backend)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit, cache


def eval_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) of each window over a text of n_tokens, as transformers' guide walks it."""
    if not 0 < stride <= context:
        raise UserError(f"stride must be in [1, context={context}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood per scored token, in nats
    windows: int
    eval_s: float  # compile time excluded
    compile_s: float
    # -log p of each scored token, in text order (token first + i for i = 0, 1, ...; first is 1).
    nlls: np.ndarray = dataclasses.field(default=None, repr=False)

    def stats(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "nlls"}


def perplexity(
    weights: Weights,
    cfg: ModelConfig,
    ids: Sequence[int],
    *,
    context: int,
    stride: int | None = None,
    window: int | None = None,
    sinks: int = 2,
    chunk: int = gen.PREFILL_CHUNK,
    backend: str = "xla",
    programs: gen.Programs | None = None,
) -> PerplexityResult:
    """exp(mean NLL) of `ids` in sliding windows of `context` tokens every `stride` (default context // 2).

    `window` < context: the cache is a ring of `window` slots with `sinks` attention sinks.
    """
    ids = np.asarray(ids, np.int32)
    if len(ids) < 2:
        raise UserError(f"the text is {len(ids)} token(s); perplexity needs at least 2")
    stride = stride or max(1, context // 2)
    slots, ring_sinks = gen.cache_slots(context, window, sinks)
    programs = programs or gen.Programs()
    cache = model.init_cache(cfg, slots, ring_sinks=ring_sinks)
    windows = eval_windows(len(ids), context, stride)
    compile_before = programs.compile_s
    nlls = []
    t0 = time.perf_counter()
    for begin, end, first in windows:
        w = ids[begin:end]
        # A cache reused from the last window needs no clearing: a window writes from position 0 and
        # attention never reads a slot that the window has not written yet.
        for start, n, length in gen._plan_prefill(0, len(w), chunk, slots, ring_sinks):
            tokens, positions, _ = gen._chunk_args(w, start, n, length)
            targets = np.zeros(length, np.int32)
            targets[: n] = np.append(w, 0)[start + 1 : start + n + 1]
            nll, cache = programs(
                score_chunk, weights, cache, tokens, positions, jnp.asarray(targets),
                cfg=cfg, attn_len=gen.attn_bucket(start + n, slots), backend=backend,
            )  # fmt: skip
            # Row i predicts window token i + 1, text token begin + i + 1; keep those at or past `first`.
            rows = np.arange(start, start + n)
            keep = (begin + rows + 1 >= first) & (rows + 1 < len(w))
            nlls.append(np.asarray(nll)[:n][keep])
    eval_s = time.perf_counter() - t0 - (programs.compile_s - compile_before)
    nlls = np.concatenate(nlls).astype(np.float64)
    mean = float(np.mean(nlls))
    return PerplexityResult(
        perplexity=math.exp(mean), tokens=len(nlls), nll=mean, windows=len(windows),
        eval_s=eval_s, compile_s=programs.compile_s - compile_before, nlls=nlls,
    )  # fmt: skip


# -- passkey -----------------------------------------------------------------------

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_MAX = 50000


def passkey_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_prompt(key: int, pos: int, junk_lines: int) -> str:
    """The intro, `junk_lines` lines of filler with the key's line before filler line `pos`, and the question."""
    if not 0 <= pos <= junk_lines:
        raise UserError(f"passkey_pos must be in [0, junk_lines={junk_lines}], got {pos}")
    parts = [PASSKEY_INTRO]
    for i in range(junk_lines + 1):
        if i == pos:
            parts.append(passkey_line(key))
        if i < junk_lines:
            parts.append(PASSKEY_FILLER)
    parts.append(PASSKEY_QUESTION)
    return " ".join(parts)


def parse_answer(text: str) -> int | None:
    """The first whole number in the model's answer, or None."""
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def junk_lines_for(tokenizer, context: int, room: int = 32) -> int:
    """The most filler lines whose prompt leaves `room` tokens of the context free."""
    base = len(tokenizer.encode(passkey_prompt(PASSKEY_MAX - 1, 0, 0)))
    per_line = len(tokenizer.encode(passkey_prompt(PASSKEY_MAX - 1, 0, 64))) - base
    return max(0, (context - room - base) * 64 // per_line)


@dataclasses.dataclass
class PasskeyResult:
    key: int
    pos: int  # filler lines before the key's line
    junk_lines: int
    key_token: int  # token position where the key's line starts
    prompt_tokens: int
    answer: int | None
    text: str  # the model's greedy answer
    found: bool

    @property
    def depth(self) -> float:
        """Where the key sits in the prompt, 0 (start) to 1 (end)."""
        return self.key_token / self.prompt_tokens

    def stats(self) -> dict:
        return {**dataclasses.asdict(self), "depth": self.depth}


def passkey(
    generator: gen.Generator,
    *,
    junk_lines: int,
    key: int | None = None,
    pos: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 8,
) -> PasskeyResult:
    """Hides `key` (random in [1, 50000) by default) before filler line `pos` (random by default),
    asks for it, and reads the first number of the greedy answer."""
    rng = random.Random(seed)
    key = rng.randrange(1, PASSKEY_MAX) if key is None else key
    pos = rng.randrange(0, junk_lines + 1) if pos is None else pos
    tok = generator.tokenizer
    prompt = passkey_prompt(key, pos, junk_lines)
    ids = tok.encode(prompt)
    key_token = len(tok.encode(prompt[: prompt.index(passkey_line(key))]))
    generator.reset()
    out = generator.generate(ids, max_new_tokens=max_new_tokens)
    answer = parse_answer(out.text)
    return PasskeyResult(
        key=key, pos=pos, junk_lines=junk_lines, key_token=key_token, prompt_tokens=len(ids),
        answer=answer, text=out.text, found=answer == key,
    )  # fmt: skip
