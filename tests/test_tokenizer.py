"""Tokenizers from GGUF vocabularies and HF directories, checked against transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from yalm_jax.errors import UserError
from yalm_jax.loading.gguf import open_gguf
from yalm_jax.tokenizer import tokenizer_from_hf_dir

TEXTS = [
    "Hello, world!",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Emoji: 😀🎉👩‍👩‍👧 and flags 🇫🇷🇯🇵!",
    "中文分词测试，日本語のテキスト、한국어 텍스트.",
    "spaces:   three,\t\ttabs,      six  \n\n\nnewlines\r\n  end   ",
    "   leading and trailing   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Numbers 12345 and 3.14159, version v2.0.1; x_1=7e-3",
    "Ünïcödé àccents ﬁ ligature — em dash… «quotes» ‘single’",
    "mixed<|im_end|>special<|endoftext|>tokens",
    "",
]


def _random_text(rng: np.random.Generator, n: int = 60) -> str:
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789 \n\t.,;:!?'\"()[]{}<>") + list("éßñ中文😀🎉ü")
    return "".join(rng.choice(alphabet, size=n))


# ---- SmolLM2 (gpt2 BPE, pre "smollm") vs transformers' GGUF tokenizer ---------------------


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_gguf):
    return open_gguf(smollm2_gguf)[2]


@pytest.fixture(scope="module")
def smollm2_hf_tok(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))


def test_smollm2_ids_match_transformers(smollm2_tok, smollm2_hf_tok):
    for text in TEXTS:
        assert smollm2_tok.encode(text) == smollm2_hf_tok.encode(text), text
        plain = smollm2_tok.encode(text, add_special_tokens=False)
        assert plain == smollm2_hf_tok.encode(text, add_special_tokens=False), text


# SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split digits off before GPT-2's
# regex; transformers' GGUF converter does not know "smollm" and uses GPT-2's regex alone. The two differ
# only on whitespace runs followed by a digit ("a\t\t7": "\t\t" is one token for SmolLM2, two for GPT-2).
SMOLLM2_HUB_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def test_smollm2_random_text_matches_hub_pre_tokenizer(smollm2_tok, smollm2_hf_tok):
    from tokenizers import Tokenizer as HFTokenizer

    spec = json.loads(smollm2_hf_tok.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = SMOLLM2_HUB_PRE_TOKENIZER
    ref = HFTokenizer.from_str(json.dumps(spec))
    rng = np.random.default_rng()
    for text in [_random_text(rng) for _ in range(8)] + ["a\t\t7 and  42"]:
        assert smollm2_tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids
    ours = smollm2_tok.encode("a\t\t7", add_special_tokens=False)
    assert len(ours) == len(smollm2_hf_tok.encode("a\t\t7", add_special_tokens=False)) - 1


def test_smollm2_special_tokens(smollm2_tok, smollm2_hf_tok):
    tok = smollm2_tok
    assert tok.bos_id == smollm2_hf_tok.bos_token_id == 1
    assert not tok.add_bos
    assert {0, 2} <= tok.eos_ids  # <|endoftext|> and <|im_end|>
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert tok.vocab_size == 49152
    # Digits are split one by one (SmolLM2's own pre-tokenizer, llama.cpp's "smollm").
    assert tok.encode("2024", add_special_tokens=False) == [tok._tok.token_to_id(c) for c in "2024"]


def test_smollm2_decode_round_trip(smollm2_tok, smollm2_hf_tok):
    for text in TEXTS:
        ids = smollm2_tok.encode(text)
        assert smollm2_tok.decode(ids) == smollm2_hf_tok.decode(ids, skip_special_tokens=True)
        if "<|" not in text:
            assert smollm2_tok.decode(ids) == text


def test_smollm2_stream_decoder_concatenates_to_decode(smollm2_tok):
    rng = np.random.default_rng()
    for text in TEXTS + [_random_text(rng, 120)]:
        ids = smollm2_tok.encode(text)
        stream = smollm2_tok.stream_decoder()
        pieces = [stream.push([i]) for i in ids]
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "".join(pieces) + stream.flush() == smollm2_tok.decode(ids)
        # Uneven batches give the same text.
        stream = smollm2_tok.stream_decoder()
        cuts = sorted(rng.choice(len(ids) + 1, size=min(3, len(ids) + 1), replace=False).tolist()) if ids else []
        bounds = [0, *cuts, len(ids)]
        out = "".join(stream.push(ids[a:b]) for a, b in zip(bounds, bounds[1:]))
        assert out + stream.flush() == smollm2_tok.decode(ids)


def test_stream_decoder_holds_back_split_characters(smollm2_tok):
    ids = smollm2_tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # a 4-byte character spread over several byte-level tokens
    stream = smollm2_tok.stream_decoder()
    assert [stream.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    # An unfinished character at the very end comes out on flush, as decode() shows it.
    stream = smollm2_tok.stream_decoder()
    assert stream.push(ids[:-1]) == ""
    assert stream.flush() == smollm2_tok.decode(ids[:-1])


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 中文 😀?\n  indented"},
    ],
]


def test_smollm2_chat_template_matches_transformers(smollm2_tok, smollm2_hf_tok):
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = smollm2_tok.render_chat(messages, add_generation_prompt=gen)
            ref = smollm2_hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == ref
    assert smollm2_tok.render_chat(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")


# ---- llama-style sentencepiece from a GGUF vocabulary -----------------------------------------


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    from test_gguf import spm_vocab, write_gguf

    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    emb = np.random.default_rng().standard_normal((len(spm_vocab()[0]), 32)).astype(np.float32)
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    return write_gguf(path, {"token_embd.weight": emb}, meta={"tokenizer.chat_template": template})


SPM_TEXTS = [
    "the and thing in the end",
    "  two leading spaces",
    "Upper CASE and digits 42 fall back to bytes",
    "byte fallback: 中 😀 é",
    "the<|im_end|>and <tool> user defined",
    "line\nbreaks\n\nand\ttabs",
]


def test_spm_gguf_ids_match_transformers(spm_gguf):
    # Before 5.23, transformers left out the BOS that llama.cpp (and we) put before a GGUF sentencepiece
    # vocabulary's ids (5.17-5.22.2 checked).
    AutoTokenizer = pytest.importorskip("transformers", minversion="5.23").AutoTokenizer

    tok = open_gguf(spm_gguf)[2]
    ref = AutoTokenizer.from_pretrained(os.path.dirname(spm_gguf), gguf_file=os.path.basename(spm_gguf))
    assert tok.add_bos and tok.bos_id == 1 and 2 in tok.eos_ids
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == 1
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [tok._tok.token_to_id("<|im_end|>")]
    assert tok.decode(tok.encode("byte fallback: 中 😀 é")) == "byte fallback: 中 😀 é"


def test_spm_stream_decoder_with_byte_fallback(spm_gguf):
    tok = open_gguf(spm_gguf)[2]
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        stream = tok.stream_decoder()
        pieces = [stream.push([i]) for i in ids]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) + stream.flush() == tok.decode(ids)
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) == 5  # "▁" then four byte tokens
    stream = tok.stream_decoder()
    assert [stream.push([i]) for i in ids] == ["", "", "", "", "😀"]


def test_spm_chat_template_uses_bos_token(spm_gguf):
    tok = open_gguf(spm_gguf)[2]
    text = tok.render_chat([{"role": "user", "content": "the end"}])
    assert text == "<s>[user] the end<|im_end|>\n[assistant] "


# ---- HF directories ----------------------------------------------------------------------------


def test_hf_dir_tokenizer_json_matches_transformers(tmp_path, smollm2_hf_tok):
    from transformers import AutoTokenizer

    smollm2_hf_tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    tok = tokenizer_from_hf_dir(str(tmp_path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    assert {2, 7, 0} <= tok.eos_ids
    assert tok.chat_template
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(ref.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    for messages in CONVERSATIONS:
        assert tok.render_chat(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def spm_model_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm_model")
    corpus = d / "corpus.txt"
    rng = np.random.default_rng()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "token", "izer", "model", "jax"]
    corpus.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(400)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "tokenizer"),
        model_type="bpe",
        vocab_size=320,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # as Llama's tokenizer.model
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    os.remove(d / "tokenizer.vocab")
    os.remove(corpus)
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True})
    )
    return str(d)


def test_hf_dir_sentencepiece_model_matches_sentencepiece(spm_model_dir):
    import sentencepiece as spm

    tok = tokenizer_from_hf_dir(spm_model_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(spm_model_dir, "tokenizer.model"))
    assert tok.add_bos and tok.bos_id == sp.bos_id() and sp.eos_id() in tok.eos_ids
    # (Text that starts with a space is left out: sentencepiece then adds a second "▁", while transformers'
    # Metaspace, which we follow, does not.)
    for text in ["the quick brown fox", "jumps over the lazy dog", "tokenizer model jax", "Zebra 中 😀", "x  y\n"]:
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text


def test_hf_dir_without_tokenizer_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=str(tmp_path)):
        tokenizer_from_hf_dir(str(tmp_path))


def test_no_chat_template_is_a_user_error(spm_model_dir):
    tok = tokenizer_from_hf_dir(spm_model_dir)
    assert tok.chat_template is None
    with pytest.raises(UserError, match="chat template"):
        tok.render_chat([{"role": "user", "content": "hi"}])


def test_template_raise_exception_is_a_user_error(spm_model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(spm_model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = tokenizer_from_hf_dir(str(d))
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(UserError, match="first must be user"):
        tok.render_chat([{"role": "system", "content": "x"}])
