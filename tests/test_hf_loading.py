"""Reading transformers model directories: safetensors dtypes, shards, bad input, config keys, memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

from yalm_jax.config import ModelConfig, config_from_hf
from yalm_jax.errors import UserError
from yalm_jax.loading import hf, load_model, opening_dtype
from yalm_jax.weights import build_weights, expected_shapes

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal safetensors writer, so tests control every byte (and dtype) of the file."""
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


TINY_HF = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def tiny_tensors(dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng()
    shapes = expected_shapes(config_from_hf(TINY_HF))
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def write_model(d, tensors, config=TINY_HF, shards: int = 1) -> str:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        write_safetensors(os.path.join(d, "model.safetensors"), tensors)
        return str(d)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        write_safetensors(os.path.join(d, file), part)
        weight_map |= {n: file for n in part}
    with open(os.path.join(d, hf.INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(d)


def load(d, dtype="float32"):
    return build_weights(hf.load_hf_config(d, dtype), hf.SafetensorsSource(d))


def assert_same_weights(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- dtypes and shards ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_safetensors_dtypes_read_exactly(tmp_path, dtype):
    tensors = tiny_tensors(dtype)
    src = hf.SafetensorsSource(write_model(tmp_path, tensors))
    for name, want in tensors.items():
        got = src.get(name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


def test_half_checkpoint_fuses_and_upcasts(tmp_path):
    tensors = tiny_tensors(ml_dtypes.bfloat16)
    w = load(write_model(tmp_path, tensors))
    p = "model.layers.1."
    want = np.concatenate([tensors[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]).astype(np.float32)
    assert w.layers[1].wqkv.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(w.layers[1].wqkv), want)


def test_sharded_checkpoint_matches_single_file(tmp_path):
    tensors = tiny_tensors()
    single = load(write_model(tmp_path / "single", tensors))
    sharded = load(write_model(tmp_path / "sharded", tensors, shards=3))
    assert_same_weights(single, sharded)


def test_transformers_sharded_save_loads(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = {k: v for k, v in TINY_HF.items() if k not in ("architectures", "model_type")}
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / hf.INDEX)
    w = load(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(w.lm_head), m.lm_head.weight.detach().numpy())
    with torch.no_grad():
        want = torch.cat([m.model.layers[0].mlp.gate_proj.weight, m.model.layers[0].mlp.up_proj.weight]).numpy()
    np.testing.assert_array_equal(np.asarray(w.layers[0].w13), want)


def test_open_hf_dir_and_load_model(tiny_llama_chat_model):
    cfg, source, tokenizer = hf.open_hf_dir(tiny_llama_chat_model, "bfloat16")
    assert cfg.arch == "llama" and cfg.dtype == "bfloat16"
    assert source.has("model.embed_tokens.weight") and tokenizer.encode("Hello")
    loaded = load_model(tiny_llama_chat_model)
    assert loaded.cfg.dtype == "float32" and loaded.weights.embed.shape == (cfg.vocab_size, cfg.dim)


def test_auto_dtype_is_f32_on_the_cpu_and_the_stored_one_on_a_gpu(tiny_llama_chat_model, tmp_path, monkeypatch):
    """--dtype=auto: a bf16 checkpoint computes in bf16 on a GPU (as transformers' dtype="auto" loads it) and in
    f32 on the CPU, whose XLA multiplies 16-bit matrices slowly; an f32 checkpoint in f32 on both."""
    bf16_dir = tmp_path / "bf16"
    shutil.copytree(tiny_llama_chat_model, bf16_dir)
    config = json.loads((bf16_dir / "config.json").read_text())
    config.pop("torch_dtype", None)
    (bf16_dir / "config.json").write_text(json.dumps(dict(config, dtype="bfloat16")))
    loaded = load_model(str(bf16_dir), "auto")
    want = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    assert loaded.cfg.dtype == want and loaded.weights.embed.dtype == want
    assert load_model(tiny_llama_chat_model, "auto").cfg.dtype == "float32"
    assert opening_dtype("float16") == "float16"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert opening_dtype("auto") is None  # the openers' "as stored"


# ---- bad input -----------------------------------------------------------------------------


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(UserError) as e:
        load_model(str(tmp_path / "nope"))
    assert "no such file" in _one_line(e)
    with pytest.raises(UserError):
        hf.open_hf_dir(str(tmp_path / "nope"), "float32")


def test_directory_without_config_or_weights(tmp_path):
    with pytest.raises(UserError) as e:
        hf.load_hf_config(str(tmp_path), "float32")
    assert "config.json" in _one_line(e)
    with pytest.raises(UserError) as e:
        hf.SafetensorsSource(str(tmp_path))
    assert "model.safetensors" in _one_line(e)


def test_truncated_safetensors(tmp_path):
    d = write_model(tmp_path, tiny_tensors())
    path = os.path.join(d, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(UserError) as e:
        hf.SafetensorsSource(d)
    assert "truncated" in _one_line(e)


@pytest.mark.parametrize(
    "content", [b"", b"hello", (10**12).to_bytes(8, "little") + b"{}", (8).to_bytes(8, "little") + b"{not json"]
)
def test_corrupt_safetensors(tmp_path, content):
    d = write_model(tmp_path, {})
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(content)
    with pytest.raises(UserError) as e:
        hf.SafetensorsSource(d)
    assert "model.safetensors" in _one_line(e)


def _model_with_header(tmp_path, header: dict, n_data: int) -> str:
    """A model directory whose model.safetensors has `header` and `n_data` zero bytes of data."""
    d = write_model(tmp_path, {})
    raw = json.dumps(header).encode()
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + bytes(n_data))
    return d


def test_header_offsets_inconsistent_with_shape(tmp_path):
    d = _model_with_header(tmp_path, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 16)
    with pytest.raises(UserError) as e:
        hf.SafetensorsSource(d)
    assert "inconsistent" in _one_line(e)


def test_missing_shard(tmp_path):
    d = write_model(tmp_path, tiny_tensors(), shards=2)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(UserError) as e:
        hf.SafetensorsSource(d)
    assert "missing" in _one_line(e)


def test_missing_tensor(tmp_path):
    tensors = tiny_tensors()
    del tensors["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(UserError) as e:
        load(write_model(tmp_path, tensors))
    assert "model.layers.1.mlp.down_proj.weight" in _one_line(e)


def test_tensor_of_wrong_shape(tmp_path):
    d = write_model(tmp_path, tiny_tensors(), config={**TINY_HF, "intermediate_size": 40})
    with pytest.raises(UserError) as e:
        load(d)
    assert "mlp.gate_proj.weight has shape (48, 32), expected (40, 32)" in _one_line(e)


def test_unsupported_tensor_dtype(tmp_path):
    # Complex tensors: a dtype safetensors knows and no model of ours uses.
    d = _model_with_header(tmp_path, {"x": {"dtype": "C64", "shape": [4], "data_offsets": [0, 32]}}, 32)
    with pytest.raises(UserError) as e:
        hf.SafetensorsSource(d).get("x")
    assert "C64" in _one_line(e)


GPT2 = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12)
GEMMA = dict(
    TINY_HF, architectures=["GemmaForCausalLM"], model_type="gemma", hidden_act="gelu_pytorch_tanh", head_dim=8
)


@pytest.mark.parametrize("config,name", [(GPT2, "GPT2LMHeadModel"), (GEMMA, "GemmaForCausalLM")])
def test_unsupported_architecture(tmp_path, config, name):
    d = write_model(tmp_path, tiny_tensors(), config=config)
    with pytest.raises(UserError) as e:
        hf.load_hf_config(d, "float32")
    assert "unsupported architecture" in _one_line(e) and name in _one_line(e)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"hidden_act": "gelu"}, "activation"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
    ],
)
def test_unsupported_config_values(change, words):
    d = {k: v for k, v in {**TINY_HF, **change}.items() if v is not None}
    with pytest.raises(UserError, match=words):
        config_from_hf(d)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(UserError) as e:
        hf.load_hf_config(str(tmp_path), "float32")
    assert "not valid JSON" in _one_line(e)


# ---- config.json keys of transformers 4.x and 5.x ------------------------------------------

LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
V4 = dict(
    TINY_HF,
    rope_theta=500000.0,
    rope_scaling=dict(LLAMA3_SCALING, rope_type="llama3"),
    torch_dtype="bfloat16",
    transformers_version="4.46.0",
)
V5 = dict(
    TINY_HF,
    rope_parameters=dict(LLAMA3_SCALING, rope_type="llama3", rope_theta=500000.0),
    dtype="bfloat16",
    transformers_version="5.0.0",
)


def test_config_4x_and_5x_keys_agree():
    a, b = config_from_hf(V4), config_from_hf(V5)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling.original_max_position_embeddings == 8192
    # The oldest spelling: rope_scaling {"type": ...}.
    old = dict(V4, rope_scaling=dict(LLAMA3_SCALING, type="llama3"))
    assert config_from_hf(old) == a


def test_config_dtype_keys():
    assert config_from_hf(V4).dtype == "float32"  # the caller's compute dtype wins
    assert config_from_hf(V4, dtype=None).dtype == "bfloat16"
    assert config_from_hf(V5, dtype=None).dtype == "bfloat16"
    assert config_from_hf(dict(TINY_HF, torch_dtype="float16"), dtype=None).dtype == "float16"
    assert config_from_hf(TINY_HF, dtype=None).dtype == "float32"


def test_config_default_rope():
    assert config_from_hf(TINY_HF).rope_theta == 10000.0 and config_from_hf(TINY_HF).rope_scaling is None
    v5 = dict(TINY_HF, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert config_from_hf(v5).rope_theta == 1e6 and config_from_hf(v5).rope_scaling is None


def test_config_head_dim_and_kv_heads():
    cfg = config_from_hf(dict(TINY_HF, head_dim=16, num_key_value_heads=None))
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.q_dim) == (16, 4, 64)


def test_config_sliding_windows():
    mistral = dict(TINY_HF, architectures=["MistralForCausalLM"], model_type="mistral")
    assert config_from_hf(dict(mistral, sliding_window=4096)).sliding_window == 4096
    assert config_from_hf(dict(mistral, sliding_window=None)).sliding_window is None
    assert config_from_hf(dict(TINY_HF, sliding_window=16)).sliding_window is None  # Llama has none
    qwen2 = dict(TINY_HF, architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096)
    assert config_from_hf(qwen2).qkv_bias
    assert config_from_hf(dict(qwen2, use_sliding_window=False)).sliding_window is None
    # max_window_layers beyond the layer count: no layer slides.
    assert config_from_hf(dict(qwen2, use_sliding_window=True, max_window_layers=28)).sliding_window is None
    assert config_from_hf(dict(qwen2, use_sliding_window=True, max_window_layers=0)).sliding_window == 4096
    with pytest.raises(UserError, match="some layers"):
        config_from_hf(dict(qwen2, use_sliding_window=True, max_window_layers=1))


def test_config_is_hashable_and_static():
    cfg = config_from_hf(V5)
    assert isinstance(cfg, ModelConfig) and hash(cfg) == hash(config_from_hf(V4))


# ---- memory --------------------------------------------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    jnp.zeros(1).block_until_ready()
    from yalm_jax import weights
    from yalm_jax.loading import hf
    from yalm_jax.weights import build_weights

    weights.LOAD_THREADS = 8  # as on a machine of many cores: layers load side by side

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    out = []
    for d in sys.argv[1:]:
        base = status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            base = max(base, status("VmHWM"))
        w = build_weights(hf.load_hf_config(d, "float32"), hf.SafetensorsSource(d))
        jax.block_until_ready(w)
        out.append({"dir": d, "weights": w.nbytes(), "peak": status("VmHWM") - base})
        del w
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_rss_while_loading(tmp_path):
    """Loading never holds the weights twice: peak RSS <= 1.3x the f32 weights + a fixed 64 MiB."""
    dim, hidden, layers, vocab = 1024, 640, 16, 8192  # ~440 MiB of f32 weights, 8 layers loading at once
    config = dict(
        TINY_HF, vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8,
    )
    shapes = expected_shapes(config_from_hf(config))
    dirs = []
    for dtype in (np.float32, ml_dtypes.bfloat16):
        tensors = {k: np.full(s, 0.01, dtype) for k, s in shapes.items()}
        dirs.append(write_model(tmp_path / np.dtype(dtype).name, tensors, config=config))
        del tensors
    for d in dirs:  # one process each: freed weights would otherwise flatter the second peak
        res = subprocess.run([sys.executable, "-c", _MEASURE, d], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        (r,) = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{os.path.basename(r['dir'])}: peak {r['peak'] / 2**20:.0f} MiB for {r['weights'] / 2**20:.0f} MiB")
        assert r["peak"] <= 1.3 * r["weights"] + 64 * 2**20
