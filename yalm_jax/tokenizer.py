"""Text to token ids and back, for HF model directories and GGUF files alike.

Every tokenizer is a `tokenizers.Tokenizer` underneath: HF directories bring a
`tokenizer.json` (or a sentencepiece `tokenizer.model`, rebuilt here as a
byte-fallback BPE), and GGUF files bring a vocabulary that is rebuilt the way
transformers' GGUF converter and llama.cpp read it. `Tokenizer` adds what
generation needs on top: the BOS rule, the ids that end a turn, the chat
template and a streaming decoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from yalm_jax.errors import UserError

# Tokens that end an assistant turn in the common chat formats.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|endoftext|>")

# llama.cpp token types (tokenizer.ggml.token_type); sentencepiece uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes, by tokenizer.ggml.pre, as llama.cpp and transformers' GGUF converter use them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# GPT-2's regex after splitting every digit on its own (SmolLM2's tokenizer.json; llama.cpp's "smollm").
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "codeshell")
_GPT2_PRES = ("default", "gpt2", "gpt-2", "")


class Tokenizer:
    """Encode, decode, stream and render chats; see the module docstring."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        extra_eos_ids: Sequence[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        strip_leading_space: bool = False,
        template_tokens: dict[str, str] | None = None,
    ):
        self._tok = backend
        self.bos_id = bos_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template or None
        # Sentencepiece models prepend a space when encoding; decode removes it again (once, at the start).
        self._strip_leading_space = strip_leading_space
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        eos = {i for i in extra_eos_ids if i is not None}
        if eos_id is not None:
            eos.add(eos_id)
        for text in END_OF_TURN_TOKENS:
            tid = backend.token_to_id(text)
            if tid is not None:
                eos.add(tid)
        self.eos_id = eos_id
        self.eos_ids = frozenset(int(i) for i in eos)
        self._template_tokens = {k: v for k, v in (template_tokens or {}).items() if v is not None}
        self._template = None

    # -- ids -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8, kept by surrogateescape
            raise UserError(f"the text is not UTF-8 (at character {e.start}); convert it first") from None
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = self._decode_raw(ids)
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def _decode_raw(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    # -- chat ------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise UserError("this model has no chat template; pass a raw prompt instead of chat messages")
        import jinja2

        if self._template is None:
            try:
                self._template = _compile_template(self.chat_template)
            except jinja2.TemplateError as e:
                raise UserError(f"the model's chat template does not compile: {e}") from None
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._template_tokens
            )
        except jinja2.TemplateError as e:
            raise UserError(f"chat template error: {e}") from None


class StreamDecoder:
    """Turns ids pushed one batch at a time into text, never emitting half a character.

    Decodes a short window (the last emitted piece plus the new ids) rather than
    everything so far; the text of the window minus the text of its first part is
    new. A window whose text ends in U+FFFD is an unfinished UTF-8 sequence (byte
    fallback or byte-level BPE): it is held back until the next push completes it.
    The pushed pieces, plus `flush()`, concatenate to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this have been emitted
        self._started = False

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(int(i) for i in ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back (an unfinished character at the very end), as decode() shows it."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._tok._decode_raw(self._ids[self._prefix : self._read])
        text = self._tok._decode_raw(self._ids[self._prefix :])
        if not final and text.endswith("\ufffd"):
            return ""
        new = text[len(before) :] if text.startswith(before) else text
        self._prefix, self._read = self._read, len(self._ids)
        if not self._started and new:
            self._started = True
            if self._tok._strip_leading_space and new.startswith(" "):
                new = new[1:]
        return new


def _compile_template(source: str):
    """A sandboxed jinja2 template with the globals and filters transformers gives chat templates."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


# -- building the backend ---------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of every byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _add_typed_tokens(tok: HFTokenizer, tokens: Sequence[str], types: Sequence[int], allowed=None) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so text containing them
    maps to their ids whole."""
    special = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == CONTROL and (allowed is None or set(t) <= allowed)
    ]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], types: Sequence[int], pre: str | None) -> HFTokenizer:
    """GPT-2 style byte-level BPE from a GGUF vocabulary (tokenizer.ggml.model == "gpt2")."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(key, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre = pre or "default"
    if pre in _PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGIT_SPLIT_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in _GPT2_PRES:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        supported = sorted([*_PRE_SPLITS, *_DIGIT_SPLIT_PRES, "default"])
        raise UserError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(supported)}")
    tok.decoder = decoders.ByteLevel()
    _add_typed_tokens(tok, tokens, types, allowed=alphabet)
    return tok


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float], skip: set[str]) -> list[tuple[str, str]]:
    """Sentencepiece BPE merges recovered from the vocabulary: a token whose two halves are both tokens is a
    merge, ranked by the token's score (best first), as transformers' `generate_merges` does."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = []
    for token, score in zip(tokens, scores):
        if token in skip:
            continue
        local = []
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                local.append((left, right, score))
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def sentencepiece_bpe(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], add_prefix_space: bool = True
) -> HFTokenizer:
    """Llama-style sentencepiece as a byte-fallback BPE (transformers' LlamaTokenizer / GGUF llama converter)."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    merges = merges_from_scores(tokens, scores, skip=set())
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    # No Strip step: Tokenizer.decode removes the one leading space itself, so windows decode consistently.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = list(tokens)
    spec_types = [CONTROL if ty == UNKNOWN else ty for ty in types]
    _add_typed_tokens(tok, specials, spec_types)
    return tok


# -- GGUF -------------------------------------------------------------------------


def tokenizer_from_gguf(meta: dict | str | os.PathLike) -> Tokenizer:
    """A tokenizer from a GGUF file's path, or from its metadata (`loading.gguf.read_gguf(path).metadata`)."""
    if not isinstance(meta, dict):
        from yalm_jax.loading.gguf import read_gguf

        meta = read_gguf(os.fspath(meta)).metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise UserError("the GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if kind == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if not merges:
            raise UserError("the GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
        backend = byte_level_bpe(tokens, merges, types, meta.get("tokenizer.ggml.pre"))
        strip, default_add_bos = False, False
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise UserError("the GGUF llama tokenizer has no tokenizer.ggml.scores")
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend = sentencepiece_bpe(tokens, scores, types, add_prefix_space=prefix)
        strip, default_add_bos = prefix, True
    else:
        raise UserError(f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2, llama")

    def token_of(key: str) -> tuple[int | None, str | None]:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None or not 0 <= int(i) < len(tokens):
            return None, None
        return int(i), tokens[int(i)]

    bos_id, bos = token_of("bos_token_id")
    eos_id, eos = token_of("eos_token_id")
    eot_id, _ = token_of("eot_token_id")
    _, unk = token_of("unknown_token_id")
    _, pad = token_of("padding_token_id")
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        extra_eos_ids=[eot_id] if eot_id is not None else (),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        chat_template=meta.get("tokenizer.chat_template"),
        strip_leading_space=strip,
        template_tokens={"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad},
    )


# -- HF directories ---------------------------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _token_str(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _without_leading_strip(tok: HFTokenizer) -> tuple[HFTokenizer, bool]:
    """Moves a decoder's "strip the first space" step out of the backend (see `Tokenizer.decode`)."""
    spec = json.loads(tok.to_str())
    dec = spec.get("decoder")
    if not dec:
        return tok, False
    strip = False
    if dec.get("type") == "Sequence":
        steps = dec.get("decoders", [])
        kept = [d for d in steps if not (d.get("type") == "Strip" and d.get("start") == 1 and d.get("stop") == 0)]
        strip = len(kept) != len(steps)
        dec["decoders"] = kept
    elif dec.get("type") == "Metaspace" and dec.get("prepend_scheme", "always") != "never":
        spec["decoder"] = {"type": "Replace", "pattern": {"String": dec.get("replacement", "▁")}, "content": " "}
        strip = True
    if not strip:
        return tok, False
    return HFTokenizer.from_str(json.dumps(spec)), True


def _sentencepiece_file(path: str) -> tuple[HFTokenizer, bool]:
    try:
        import sentencepiece as spm
    except ImportError:  # pragma: no cover - sentencepiece is a dependency
        raise UserError(f"{path}: reading tokenizer.model needs the sentencepiece package") from None
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable sentencepiece model ({e})") from None
    n = sp.GetPieceSize()
    tokens = [sp.IdToPiece(i) for i in range(n)]
    scores = [sp.GetScore(i) for i in range(n)]
    types = []
    for i in range(n):
        if sp.IsUnknown(i):
            types.append(UNKNOWN)
        elif sp.IsControl(i):
            types.append(CONTROL)
        elif sp.IsByte(i):
            types.append(BYTE)
        elif sp.IsUnused(i):
            types.append(UNUSED)
        else:
            types.append(NORMAL)
    prefix = True
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        prefix = proto.normalizer_spec.add_dummy_prefix
        for i, piece in enumerate(proto.pieces):
            if piece.type == piece.USER_DEFINED:
                types[i] = USER_DEFINED
    except Exception:  # protobuf missing or an odd file: keep sentencepiece's defaults
        pass
    return sentencepiece_bpe(tokens, scores, types, add_prefix_space=prefix), prefix


def tokenizer_from_hf_dir(model_dir: str) -> Tokenizer:
    """The tokenizer of a transformers model directory: tokenizer.json, else tokenizer.model."""
    tj = os.path.join(model_dir, "tokenizer.json")
    sp = os.path.join(model_dir, "tokenizer.model")
    if os.path.isfile(tj):
        try:
            backend = HFTokenizer.from_file(tj)
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise UserError(f"{tj}: not a readable tokenizer ({str(e).splitlines()[0] if str(e) else e})") from None
        backend, strip = _without_leading_strip(backend)
    elif os.path.isfile(sp):
        backend, strip = _sentencepiece_file(sp)
    else:
        raise UserError(f"{model_dir}: no tokenizer.json or tokenizer.model")

    cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    gen = _read_json(os.path.join(model_dir, "generation_config.json"))
    special = _read_json(os.path.join(model_dir, "special_tokens_map.json"))

    def tok(name: str) -> str | None:
        return _token_str(cfg.get(name)) or _token_str(special.get(name))

    def tid(text: str | None) -> int | None:
        return backend.token_to_id(text) if text else None

    bos, eos = tok("bos_token"), tok("eos_token")
    bos_id, eos_id = tid(bos), tid(eos)
    gen_eos = gen.get("eos_token_id")
    extra = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    if bos_id is None and isinstance(gen.get("bos_token_id"), int):
        bos_id = gen["bos_token_id"]
        bos = backend.id_to_token(bos_id)
    if "add_bos_token" in cfg:
        add_bos = bool(cfg["add_bos_token"])
    else:
        # The tokenizer.json post-processor says whether BOS is added (Llama 3 does, Qwen2 does not).
        with_special = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and bool(with_special) and with_special[0] == bos_id
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        extra_eos_ids=[int(i) for i in extra],
        add_bos=add_bos,
        chat_template=template,
        strip_leading_space=strip,
        template_tokens={
            "bos_token": bos,
            "eos_token": eos,
            "unk_token": tok("unk_token"),
            "pad_token": tok("pad_token"),
        },
    )
