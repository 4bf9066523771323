"""The GGUF loader: config from metadata, dequantization, llama.cpp's Q/K permutation, bad files."""

from __future__ import annotations

import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from yalm_jax.errors import UserError
from yalm_jax.loading import load_model
from yalm_jax.loading.gguf import SUPPORTED_QUANTS, is_gguf, open_gguf, read_gguf, stored_dtype
from yalm_jax.model import forward, init_cache

# ---- writing small GGUF files ------------------------------------------------------------------


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A tiny llama-style sentencepiece vocabulary: specials, 256 byte tokens, letters and a few merges."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["▁" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["th", "he", "in", "er", "an", "▁th", "▁the", "▁an", "▁and", "nd", "▁in", "ing", "▁the▁"]
    tokens += pieces
    types += [1] * len(pieces)
    tokens += ["<|im_end|>", "<tool>"]
    types += [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    return tokens, scores, types


def write_gguf(path, tensors: dict, *, arch="llama", meta=None, vocab=None, hp=None):
    """Writes `tensors` (GGUF name -> float array in (out, in) layout, or (array, quant type)) with llama metadata."""
    w = gguf.GGUFWriter(str(path), arch)
    hp = hp or {}
    w.add_block_count(hp.get("n_layers", 1))
    w.add_context_length(hp.get("ctx", 256))
    w.add_embedding_length(hp.get("dim", 32))
    w.add_feed_forward_length(hp.get("hidden", 64))
    w.add_head_count(hp.get("n_heads", 2))
    w.add_head_count_kv(hp.get("n_kv_heads", 1))
    w.add_rope_freq_base(hp.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(hp.get("eps", 1e-5))
    w.add_rope_dimension_count(hp.get("head_dim", 16))
    tokens, scores, types = vocab or spm_vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    for name, value in tensors.items():
        arr, qtype = value if isinstance(value, tuple) else (value, QT.F32)
        if qtype == QT.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif qtype == QT.F16:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
        else:
            w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out the way llama.cpp has it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_tensors(state: dict, n_layers: int, n_heads: int, n_kv_heads: int) -> dict:
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    out = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if "lm_head.weight" in state:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(n_layers):
        for hf, gg in names.items():
            w = state[f"model.layers.{i}.{hf}"]
            if gg == "attn_q.weight":
                w = llamacpp_permute(w, n_heads)
            elif gg == "attn_k.weight":
                w = llamacpp_permute(w, n_kv_heads)
            out[f"blk.{i}.{gg}"] = w
    return out


def run_logits(path: str, ids: list[int]) -> np.ndarray:
    m = load_model(path, "float32")
    logits, _ = forward(
        m.weights, init_cache(m.cfg, 64), jnp.asarray(ids, jnp.int32), jnp.arange(len(ids), dtype=jnp.int32), cfg=m.cfg
    )
    return np.asarray(logits)


# ---- a random transformers Llama, written to GGUF as llama.cpp would ---------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_random_llama_gguf_matches_transformers(tmp_path, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = spm_vocab()
    torch.manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    hf_cfg = LlamaConfig(
        vocab_size=len(vocab[0]),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a mix-up between them shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    tensors = hf_to_gguf_tensors(state, 2, 4, 2)
    path = write_gguf(
        tmp_path / "tiny.gguf",
        tensors,
        vocab=vocab,
        hp=dict(n_layers=2, dim=64, hidden=96, n_heads=4, n_kv_heads=2, head_dim=16, ctx=256),
    )
    cfg, _, _ = open_gguf(path)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (4, 2, 16, len(vocab[0]))
    assert cfg.tie_embeddings == tied

    ids = np.random.default_rng().integers(3, len(vocab[0]), size=17).tolist()
    ours = run_logits(path, ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= 1e-4, err


def test_qk_unpermute_inverts_llamacpp_permute():
    from yalm_jax.loading.gguf import unpermute_rows

    rng = np.random.default_rng()
    for heads, head_dim in ((4, 16), (3, 64), (1, 8)):
        w = rng.standard_normal((heads * head_dim, 24)).astype(np.float32)
        p = llamacpp_permute(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_rows(p, heads), w)
        b = rng.standard_normal(heads * head_dim).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rows(llamacpp_permute(b, heads), heads), b)


# ---- quantization types --------------------------------------------------------------------------
# gguf's numpy code quantizes only the simple formats; the K-quants are packed here from the format
# definitions in ggml-quants.c, with plain (not optimal) scale choices.


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _kquant_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Packs 8 6-bit scales and 8 6-bit mins per block into 12 bytes (ggml's get_scale_min_k4 layout)."""
    n = sc.shape[0]
    out = np.zeros((n, 12), np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def _affine_kquant(x: np.ndarray, bits: int):
    """Blocks of 256 as 8 sub-blocks of 32: x ~ d*sc*q - dmin*m with 6-bit sc, m and `bits`-bit q."""
    levels = 2**bits - 1
    sub = x.reshape(-1, 8, 32).astype(np.float64)
    lo = np.minimum(sub.min(-1), 0)
    scale = (sub.max(-1) - lo) / levels
    d = scale.max(-1) / 63
    dmin = (-lo).max(-1) / 63
    d16, dmin16 = d.astype(np.float16).astype(np.float64), dmin.astype(np.float16).astype(np.float64)
    sc = np.clip(np.round(scale / d16[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / np.where(dmin16 > 0, dmin16, 1)[:, None]), 0, 63).astype(np.uint8)
    step = (d16[:, None] * sc)[..., None]
    offset = (dmin16[:, None] * m)[..., None]
    q = np.clip(np.round((sub + offset) / step), 0, levels).astype(np.uint8)
    return d16, dmin16, sc, m, q


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine_kquant(x, 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2j (low nibble) and 2j+1 (high)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _kquant_scales(sc, m), qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine_kquant(x, 5)
    low = q & 0xF
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    high = (q >> 4).astype(np.uint8)  # (blocks, 8 sub-blocks, 32): bit j of qh[l] is sub-block j
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= high[:, j, :] << j
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _kquant_scales(sc, m), qh, qs], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Blocks of 256 as 16 sub-blocks of 16: x ~ d * scale * (q - 32), int8 scales, 6-bit q."""
    sub = x.reshape(-1, 16, 16).astype(np.float64)
    scale = np.abs(sub).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16).astype(np.float64)
    sc = np.clip(np.round(scale / d[:, None]), 1, 127).astype(np.int8)
    q = np.clip(np.round(sub / (d[:, None] * sc)[..., None]), -32, 31).astype(np.int16) + 32
    q = q.reshape(-1, 2, 128).astype(np.uint8)  # two halves of 128 values
    low, high = q & 0xF, q >> 4
    ql = (low[:, :, 0:64] | (low[:, :, 64:128] << 4)).reshape(-1, 128)
    qh = (high[:, :, 0:32] | (high[:, :, 32:64] << 2) | (high[:, :, 64:96] << 4) | (high[:, :, 96:128] << 6))
    return np.concatenate([ql, qh.reshape(-1, 64), sc.view(np.uint8), _fp16_bytes(d)], axis=1)


def _quantize(x: np.ndarray, qtype: QT) -> np.ndarray:
    own = {QT.Q4_K: quantize_q4_k, QT.Q5_K: quantize_q5_k, QT.Q6_K: quantize_q6_k}
    if qtype in own:
        return own[qtype](x).reshape(x.shape[0], -1)
    return gguf.quants.quantize(x, qtype)


# Largest error per element, as a fraction of the block's largest |x|, and RMS error relative to RMS(x).
QUANT_BOUNDS = {
    QT.F32: (0.0, 0.0),
    QT.F16: (1e-3, 1e-3),
    QT.BF16: (4e-3, 4e-3),
    QT.Q8_0: (1 / 127, 0.01),
    QT.Q4_0: (1 / 8 + 1e-3, 0.12),
    QT.Q4_1: (1 / 15 + 1e-3, 0.1),
    QT.Q5_0: (1 / 16 + 1e-3, 0.06),
    QT.Q4_K: (2 / 15, 0.1),
    QT.Q5_K: (2 / 31, 0.05),
    QT.Q6_K: (1 / 31, 0.025),
}


@pytest.mark.parametrize("qtype", list(QUANT_BOUNDS), ids=lambda q: q.name)
def test_dequantized_tensor_has_transformers_layout(tmp_path, qtype):
    rng = np.random.default_rng()
    out_f, in_f = 96, 512  # non-square, so a transposed read cannot pass
    x = (rng.standard_normal((out_f, in_f)) * rng.uniform(0.1, 3.0, (out_f, 1))).astype(np.float32)
    x[rng.integers(0, out_f), rng.integers(0, in_f)] = 9.0  # one outlier
    data = x if qtype in (QT.F32, QT.F16) else _quantize(x, qtype)
    tensors = {"blk.0.ffn_up.weight": (data, qtype)}
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", tensors, hp=dict(dim=in_f, hidden=out_f))
    _, source, _ = open_gguf(path)
    assert source.has("model.layers.0.mlp.up_proj.weight")
    got = source.get("model.layers.0.mlp.up_proj.weight")
    assert got.shape == (out_f, in_f) and got.dtype == np.float32
    max_frac, rms_frac = QUANT_BOUNDS[qtype]
    block = 32 if qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0) else 256
    blocks_amax = np.abs(x).reshape(out_f, -1, block).max(-1, keepdims=True)
    err = np.abs(got - x).reshape(out_f, -1, block)
    assert np.all(err <= max_frac * blocks_amax + 1e-6), (err / blocks_amax).max()
    assert np.sqrt(np.mean((got - x) ** 2)) <= rms_frac * np.sqrt(np.mean(x**2)) + 1e-12
    if qtype != QT.F32:
        assert not np.array_equal(got, x)  # really went through the format


# Byte offsets of the f16 fields (scales, mins) in a block of each type quant.GGUF_TYPES maps.
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "IQ4_NL": (0,),
              "IQ4_XS": (0,), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # fmt: skip


def random_blocks(qtype: str, shape: tuple[int, int], rng, field_scale: float = 0.1) -> np.ndarray:
    """A (rows, cols) matrix of `qtype` blocks of random bytes (every bit of the format drawn), its f16 fields
    random values of either sign up to `field_scale`, so no scale overflows."""
    from yalm_jax import quant

    _, _, _, per_block, nbytes = quant.GGUF_TYPES[qtype]
    n, k = shape
    b = rng.integers(0, 256, (n * k // per_block, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        v = rng.uniform(0.01, 1.0, b.shape[0]) * rng.choice([-field_scale, field_scale], b.shape[0])
        b[:, at : at + 2] = _fp16_bytes(v)
    return b.reshape(n, -1)


def finite_random_blocks(qtype: QT, n_blocks: int, rng) -> np.ndarray:
    """Random bytes as `qtype` blocks, each drawn again until gguf dequantizes it to finite values below 1e3
    (for types whose fields F16_FIELDS does not place)."""
    _, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for _ in range(200):
        with np.errstate(all="ignore"):  # the draws this rejects
            x = gguf.quants.dequantize(b, qtype).reshape(n_blocks, -1)
        bad = ~(np.abs(x) < 1e3).all(axis=1)
        if not bad.any():
            return b
        b[bad] = rng.integers(0, 256, (int(bad.sum()), nbytes), dtype=np.uint8)
    raise AssertionError(f"no finite {qtype.name} blocks drawn")


EXACT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")  # the block's own f16 scale (and min)


@pytest.mark.parametrize("qtype", list(F16_FIELDS))
def test_mapped_blocks_keep_their_integers(qtype):
    # Every mapped type on random bytes, against gguf's own dequantization. Where a block's scale is its f16
    # field, bit for bit; where it is that field times a sub-block's 4- to 8-bit scale (the K-quants,
    # IQ4_XS), each value within 2^-11 of |scale q| + |min| (the product rounded to f16). A misplaced integer
    # or scale would cost a whole step, hundreds of times that.
    from yalm_jax import quant

    assert set(F16_FIELDS) == set(quant.GGUF_TYPES)
    rng = np.random.default_rng()
    shape = (24, 512)
    blocks = random_blocks(qtype, shape, rng)
    qm = quant.from_gguf_blocks(blocks, qtype, shape)
    assert qm.stored_form == quant.gguf_form(qtype, shape)
    want = gguf.quants.dequantize(blocks, QT[qtype]).reshape(shape)
    got = np.asarray(qm.dequantize(jnp.float32))
    if qm.fmt == "iq4":  # as it is placed for float products: int8 holding its levels, the same values
        np.testing.assert_array_equal(np.asarray(quant.iq4_as_int8(qm).dequantize(jnp.float32)), got)
    if qtype in EXACT_TYPES:
        np.testing.assert_array_equal(got, want)
        return
    per_group = lambda a: np.repeat(np.abs(np.asarray(a, np.float32)), qm.group, axis=1)  # noqa: E731
    q = np.abs(np.asarray(quant._values(qm)))  # the integers (or iq4's levels) the scales multiply
    bound = 2.0**-11 * (q * per_group(qm.scale) + (0 if qm.min is None else per_group(qm.min)))
    err = np.abs(got - want)
    assert (err <= bound * 1.001 + 1e-30).all(), (err / bound).max()
    assert err.max() > 0  # the f16 scales really are a rounding


@pytest.mark.parametrize("qtype", [t for t in SUPPORTED_QUANTS if t not in ("F32", "F16", "BF16")])
def test_every_supported_type_loads_in_transformers_layout(tmp_path, qtype):
    # Random blocks of each type (the importance-matrix and ternary types included, which load dense) as a
    # llama.cpp-permuted attn_q: the loader serves gguf's dequantization of them, rows back in transformers' order.
    from yalm_jax.loading.gguf import unpermute_rows

    rng = np.random.default_rng()
    per_block, _ = gguf.GGML_QUANT_SIZES[QT[qtype]]
    rows, cols = 64, 512
    blocks = finite_random_blocks(QT[qtype], rows * cols // per_block, rng).reshape(rows, -1)
    hp = dict(dim=cols, n_heads=4, n_kv_heads=4, head_dim=16)
    path = write_gguf(tmp_path / f"{qtype}.gguf", {"blk.0.attn_q.weight": (blocks, QT[qtype])}, hp=hp)
    _, source, _ = open_gguf(path)
    got = source.get("model.layers.0.self_attn.q_proj.weight")
    want = unpermute_rows(gguf.quants.dequantize(blocks, QT[qtype]).reshape(rows, cols), 4)
    np.testing.assert_array_equal(got, want)
    assert np.abs(want).max() > 0


def test_kquant_scale_past_f16_loads_dense():
    # d * sc overflows f16 (d = 60000, sc = 127): no quantized form, so the loader reads the matrix dense.
    from yalm_jax import quant

    x = np.random.default_rng().standard_normal((2, 256)).astype(np.float32)
    blocks = _quantize(x, QT.Q6_K)
    assert quant.from_gguf_blocks(blocks, "Q6_K", x.shape) is not None
    blocks[0, 192:208] = 127
    blocks[0, 208:210] = np.array([60000], np.float16).view(np.uint8)
    assert quant.from_gguf_blocks(blocks, "Q6_K", x.shape) is None


def test_fused_parts_of_different_types_are_rounded_again_as_int8(tmp_path, monkeypatch):
    # A Q4_K_M file's layer: q and k in Q4_K, v in Q6_K (fused into one wqkv), the rest in one type each. With
    # --quant=native the wqkv becomes int8 in groups of 32, within half an int8 step of the file's values (and
    # the K-quants' f16 scales); the others keep their forms; the size estimate is what loading places.
    from yalm_jax import quant
    from yalm_jax.loading import load_model
    from yalm_jax.weights import field_nbytes

    monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", False)
    rng = np.random.default_rng()
    dim, hidden, heads, kv_heads, hd = 256, 512, 4, 2, 64
    vocab = spm_vocab()
    w = lambda n, k: (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)  # noqa: E731
    types = {"attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q6_K, "attn_output": QT.Q4_K,
             "ffn_gate": QT.Q4_K, "ffn_up": QT.Q4_K, "ffn_down": QT.Q6_K}  # fmt: skip
    shapes = {"attn_q": (heads * hd, dim), "attn_k": (kv_heads * hd, dim), "attn_v": (kv_heads * hd, dim),
              "attn_output": (dim, heads * hd), "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim),
              "ffn_down": (dim, hidden)}  # fmt: skip
    tensors = {f"blk.0.{t}.weight": (_quantize(w(*shapes[t]), types[t]), types[t]) for t in types}
    tensors |= {"token_embd.weight": w(len(vocab[0]), dim), "output.weight": w(len(vocab[0]), dim),
                "output_norm.weight": np.ones(dim, np.float32), "blk.0.attn_norm.weight": np.ones(dim, np.float32),
                "blk.0.ffn_norm.weight": np.ones(dim, np.float32)}  # fmt: skip
    hp = dict(n_layers=1, dim=dim, hidden=hidden, n_heads=heads, n_kv_heads=kv_heads, head_dim=hd)
    path = write_gguf(tmp_path / "q4_k_m.gguf", tensors, vocab=vocab, hp=hp)
    m = load_model(path, "float32", quant="native")
    layer = m.weights.layers[0]
    forms = {f: (getattr(layer, f).fmt, getattr(layer, f).group) for f in ("wqkv", "wo", "w13", "w2")}
    assert forms == {"wqkv": ("int8", 32), "wo": ("int4", 32), "w13": ("int4", 32), "w2": ("int8", 16)}
    _, source, _ = open_gguf(path)
    want = np.concatenate([source.get(f"model.layers.0.self_attn.{x}_proj.weight") for x in "qkv"])
    got = np.asarray(layer.wqkv.dequantize(jnp.float32))
    group_max = np.abs(want).reshape(want.shape[0], -1, 32).max(-1, keepdims=True)
    err = np.abs(got - want).reshape(group_max.shape[0], -1, 32)
    assert (err <= group_max * (1 / 254 + 2.0**-9)).all()
    cfg, source, _ = open_gguf(path, "float32")
    assert sum(n for _, n in field_nbytes(cfg, source, "native")) == m.weights.nbytes()


def test_every_mapped_type_keeps_its_blocks_in_the_model(tmp_path, monkeypatch):
    # A layer whose matrices come in the types llama.cpp's smaller files use (Q3_K, Q2_K, IQ4_XS, Q5_1, IQ4_NL
    # on random bytes): with --quant=native each keeps its integers in its quant form (iq4's codes only where it
    # multiplies int8 activations, else int8 holding its levels), and the model's logits are the dense load's
    # within the f16 rounding of the K-quants' scales; the size estimate is what loading places.
    from yalm_jax import quant
    from yalm_jax.weights import field_nbytes

    monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", False)
    rng = np.random.default_rng()
    dim, hidden, heads, kv_heads, hd = 256, 512, 4, 2, 64
    vocab = spm_vocab()
    types = {"attn_q": "Q3_K", "attn_k": "Q3_K", "attn_v": "Q3_K", "attn_output": "IQ4_XS", "ffn_gate": "Q2_K",
             "ffn_up": "Q2_K", "ffn_down": "Q5_1", "output": "IQ4_NL"}  # fmt: skip
    shapes = {"attn_q": (heads * hd, dim), "attn_k": (kv_heads * hd, dim), "attn_v": (kv_heads * hd, dim),
              "attn_output": (dim, heads * hd), "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim),
              "ffn_down": (dim, hidden), "output": (len(vocab[0]), dim)}  # fmt: skip
    tensors = {("" if t == "output" else "blk.0.") + f"{t}.weight": (
        random_blocks(types[t], shapes[t], rng, 0.02 / np.sqrt(shapes[t][1])), QT[types[t]]) for t in types}
    norm = lambda: (1 + 0.2 * rng.standard_normal(dim)).astype(np.float32)  # noqa: E731
    tensors |= {"token_embd.weight": rng.standard_normal((len(vocab[0]), dim)).astype(np.float32),
                "output_norm.weight": norm(), "blk.0.attn_norm.weight": norm(), "blk.0.ffn_norm.weight": norm()}
    hp = dict(n_layers=1, dim=dim, hidden=hidden, n_heads=heads, n_kv_heads=kv_heads, head_dim=hd)
    path = write_gguf(tmp_path / "small_types.gguf", tensors, vocab=vocab, hp=hp)
    dense = load_model(path, "float32", quant="none")
    cfg, source, _ = open_gguf(path, "float32")
    for int8_activations, iq4_form in ((False, ("int8", 32, False)), (True, ("iq4", 32, False))):
        native = load_model(path, "float32", quant="native", int8_activations=int8_activations)
        layer = native.weights.layers[0]
        forms = {f: getattr(layer, f).stored_form[:3] for f in ("wqkv", "wo", "w13", "w2")}
        forms["lm_head"] = native.weights.lm_head.stored_form[:3]
        assert forms == {"wqkv": ("int8", 16, False), "wo": iq4_form, "w13": ("int8", 16, True),
                         "w2": ("int8", 32, True), "lm_head": iq4_form}  # fmt: skip
        assert sum(n for _, n in field_nbytes(cfg, source, "native", int8_activations)) == native.weights.nbytes()
    native = load_model(path, "float32", quant="native")
    ids = jnp.asarray(rng.integers(3, len(vocab[0]), 9), jnp.int32)
    logits = [np.asarray(forward(m.weights, init_cache(m.cfg, 32), ids, jnp.arange(9), cfg=m.cfg)[0])
              for m in (native, dense)]  # fmt: skip
    err = np.abs(logits[0] - logits[1]).max() / np.abs(logits[1]).max()
    assert err < 2e-3, err  # 3e-4 to 4e-4 seen


def test_q_and_k_are_unpermuted_but_v_is_not(tmp_path):
    rng = np.random.default_rng()
    hp = dict(dim=32, n_heads=2, n_kv_heads=1, head_dim=16)
    q = rng.standard_normal((32, 32)).astype(np.float32)
    k = rng.standard_normal((16, 32)).astype(np.float32)
    v = rng.standard_normal((16, 32)).astype(np.float32)
    tensors = {
        "blk.0.attn_q.weight": llamacpp_permute(q, 2),
        "blk.0.attn_k.weight": llamacpp_permute(k, 1),
        "blk.0.attn_v.weight": v,
    }
    _, source, _ = open_gguf(write_gguf(tmp_path / "qkv.gguf", tensors, hp=hp))
    np.testing.assert_array_equal(source.get("model.layers.0.self_attn.q_proj.weight"), q)
    np.testing.assert_array_equal(source.get("model.layers.0.self_attn.k_proj.weight"), k)
    np.testing.assert_array_equal(source.get("model.layers.0.self_attn.v_proj.weight"), v)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from yalm_jax.config import ModelConfig, RopeScaling

    scaling = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    base = ModelConfig(
        arch="llama", vocab_size=8, dim=64, hidden_dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=64,
        norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
    )
    scaled = ModelConfig(**{**base.__dict__, "rope_scaling": scaling})
    factors = (base.rope_inv_freq() / scaled.rope_inv_freq()).astype(np.float32)  # as convert_hf_to_gguf writes them
    assert factors.min() == 1.0 and factors.max() > 30
    hp = dict(dim=64, n_heads=1, n_kv_heads=1, head_dim=64, rope_theta=500000.0, ctx=131072)
    cfg, _, _ = open_gguf(write_gguf(tmp_path / "r.gguf", {"rope_freqs.weight": factors}, hp=hp))
    assert cfg.rope_scaling == scaling
    odd = factors * np.random.default_rng().uniform(1.5, 2.0, factors.shape).astype(np.float32)
    path = write_gguf(tmp_path / "odd.gguf", {"rope_freqs.weight": odd}, hp=hp)
    _one_line_user_error(lambda: open_gguf(path), "rope")


# ---- bad input ---------------------------------------------------------------------------------


def _small_valid_gguf(tmp_path):
    rng = np.random.default_rng()
    tensors = {"token_embd.weight": rng.standard_normal((len(spm_vocab()[0]), 32)).astype(np.float32)}
    tensors["blk.0.ffn_up.weight"] = rng.standard_normal((64, 256)).astype(np.float32)
    return write_gguf(tmp_path / "ok.gguf", tensors)


def _one_line_user_error(fn, *match: str) -> str:
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg
    for m in match:
        assert m in msg, msg
    return msg


def test_truncated_file_is_a_user_error(tmp_path):
    path = _small_valid_gguf(tmp_path)
    with open(path, "rb") as f:
        data = f.read()
    for cut in (len(data) // 2, len(data) - 7, 40, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        _one_line_user_error(lambda: open_gguf(str(bad)), str(bad))
        _one_line_user_error(lambda: load_model(str(bad)), str(bad))


def test_corrupt_magic_is_a_user_error(tmp_path):
    path = _small_valid_gguf(tmp_path)
    data = bytearray(open(path, "rb").read())
    assert is_gguf(path)
    data[:4] = b"GGUX"
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(bytes(data))
    assert not is_gguf(str(bad))
    _one_line_user_error(lambda: load_model(str(bad)), "magic")


def test_garbage_after_magic_is_a_user_error(tmp_path):
    rng = np.random.default_rng()
    for version in (b"", (3).to_bytes(4, "little")):  # a random version, and garbage after a valid one
        bad = tmp_path / "garbage.gguf"
        bad.write_bytes(b"GGUF" + version + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        _one_line_user_error(lambda: load_model(str(bad)), str(bad))


def test_read_gguf_matches_gguf_reader(tmp_path):
    # read_gguf parses the header itself (gguf.GGUFReader took most of a load's time): every value type GGUF
    # has, arrays of numbers, strings and bools, and tensors of several types, against gguf's own reader.
    rng = np.random.default_rng()
    w = gguf.GGUFWriter(str(tmp_path / "all.gguf"), "llama")
    ints = {"uint8": (0, 256), "int8": (-128, 128), "uint16": (0, 1 << 16), "int16": (-(1 << 15), 1 << 15),
            "uint32": (0, 1 << 32), "int32": (-(1 << 31), 1 << 31), "uint64": (0, 1 << 62), "int64": (-(1 << 62), 1 << 62)}  # fmt: skip
    for kind, (lo, hi) in ints.items():
        getattr(w, f"add_{kind}")(f"t.{kind}", int(rng.integers(lo, hi)))
    w.add_float32("t.float32", float(rng.standard_normal()))
    w.add_float64("t.float64", float(rng.standard_normal()))
    w.add_bool("t.bool", bool(rng.integers(2)))
    w.add_string("t.string", "".join(rng.choice(list("aé字 \n<>"), 20)))
    w.add_array("t.ints", rng.integers(-1000, 1000, 50).tolist())
    w.add_array("t.floats", rng.standard_normal(50).astype(np.float32).tolist())
    w.add_array("t.strings", [f"tok{i}é" * int(rng.integers(0, 4)) for i in range(300)])
    w.add_array("t.bools", rng.integers(0, 2, 9).astype(bool).tolist())
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((5, 32)).astype(np.float16))
    blocks = random_blocks("Q8_0", (4, 64), rng)
    w.add_tensor("q8_0", blocks, raw_shape=blocks.shape, raw_dtype=QT.Q8_0)
    w.add_tensor("vector", rng.standard_normal(7).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got, want = read_gguf(str(tmp_path / "all.gguf")), gguf.GGUFReader(str(tmp_path / "all.gguf"))
    assert got.metadata == {k: f.contents() for k, f in want.fields.items() if not k.startswith("GGUF.")}
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors] == ["f32", "f16", "q8_0", "vector"]
    for t, ref in zip(got.tensors, want.tensors):
        assert t.tensor_type == ref.tensor_type and t.shape == tuple(reversed(ref.shape.tolist()))
        np.testing.assert_array_equal(t.data.reshape(-1), np.asarray(ref.data).view(np.uint8).reshape(-1))
    np.testing.assert_array_equal(got.tensors[2].data, blocks)


def test_unsupported_architecture_is_a_user_error(tmp_path):
    tensors = {"token_embd.weight": np.random.default_rng().standard_normal((300, 32)).astype(np.float32)}
    path = write_gguf(tmp_path / "falcon.gguf", tensors, arch="falcon")
    _one_line_user_error(lambda: load_model(path), path, "falcon", "architecture")


def test_unsupported_quant_type_is_a_user_error(tmp_path):
    # An integer tensor where a weight belongs: no dequantization defined.
    ints = np.random.default_rng().integers(-100, 100, (64, 256), dtype=np.int8)
    path = write_gguf(tmp_path / "i8.gguf", {"blk.0.ffn_up.weight": (ints, QT.I8)})
    _one_line_user_error(lambda: open_gguf(path), "I8", "blk.0.ffn_up.weight")


@pytest.mark.parametrize("keep_quantized", [False, True], ids=["cpu_dequantizes", "gpu_keeps_blocks"])
@pytest.mark.parametrize("choice", [None, "native", "int8"])
def test_missing_tensor_is_a_user_error(tmp_path, monkeypatch, keep_quantized, choice):
    # Also where the GPU's loading sizes the blocks before reading them (parallel.check_fits).
    from yalm_jax import quant

    monkeypatch.setattr(quant, "DEQUANTIZE_ON_CPU", not keep_quantized)
    path = _small_valid_gguf(tmp_path)  # one layer, but only token_embd and ffn_up
    _one_line_user_error(lambda: load_model(path, quant=choice), "missing tensor")


# ---- SmolLM2 (real file) vs transformers ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_gguf):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    )
    return model.eval()


def test_stored_dtype(tmp_path):
    """A file computes in its matrices' float type with --dtype=auto on a GPU: F16 where they all are, f32 where
    one is quantized or F32 (the norms, 1-D, are F32 in every file)."""
    rng = np.random.default_rng()
    norm, matrix = rng.standard_normal(32).astype(np.float32), rng.standard_normal((64, 32)).astype(np.float32)

    def dtype_of(*qtypes):
        tensors = {"output_norm.weight": norm}
        for i, q in enumerate(qtypes):
            tensors[f"blk.{i}.w"] = (matrix if q in (QT.F32, QT.F16) else _quantize(matrix, q), q)
        path = write_gguf(tmp_path / f"{'_'.join(q.name for q in qtypes)}.gguf", tensors)
        return stored_dtype(read_gguf(path).tensors)

    assert dtype_of(QT.F16, QT.F16) == "float16"
    assert dtype_of(QT.F16, QT.F32) == "float32"
    assert dtype_of(QT.F32, QT.F32) == "float32"
    assert dtype_of(QT.F16, QT.Q8_0) == "float32"


def test_smollm2_config(smollm2_gguf):
    cfg, source, tok = open_gguf(smollm2_gguf)
    assert open_gguf(smollm2_gguf, None)[0].dtype == "float32"  # stored as Q4_1 and Q8_0 blocks
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.hidden_dim) == ("llama", 30, 576, 1536)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_embeddings and not source.has("lm_head.weight")
    assert cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert source.quant_type("model.embed_tokens.weight") == "Q8_0"
    assert source.quant_type("model.layers.0.self_attn.q_proj.weight") == "Q4_1"
    assert tok.vocab_size == 49152


def test_smollm2_logits_match_transformers(smollm2_gguf, smollm2_transformers):
    m = load_model(smollm2_gguf, "float32")
    ids = m.tokenizer.encode("In 1969, astronauts landed on the Moon; here is a short poem about it:\n")
    assert 15 <= len(ids) <= 30
    logits, _ = forward(
        m.weights, init_cache(m.cfg, 64), jnp.asarray(ids, jnp.int32), jnp.arange(len(ids), dtype=jnp.int32), cfg=m.cfg
    )
    with torch.no_grad():
        ref = smollm2_transformers(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
    assert err <= 1e-4, err
    assert np.array_equal(np.asarray(logits).argmax(-1), ref.argmax(-1))
