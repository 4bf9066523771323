"""Write a quantized checkpoint that `load_model` (and scripts/generate.py --model=OUT) reads back.

  python scripts/quantize.py --model=path/to/hf_dir --out=path/to/out --quant=int8
  python scripts/quantize.py --model=... --out=... --quant=int4:128   # group size 32 (default), 64 or 128
  python scripts/quantize.py --perplexity_text=data/alice_ch1.txt       # quality table, writes nothing

OUT gets model.safetensors, in which each quantized matrix <name> is stored as
<name>.q, <name>.scale and, for int4, <name>.min (formats in yalm_jax/quant.py);
config.json, the model's own plus a "quantization" section that lists them; and
the tokenizer and generation files, copied. Norms and biases stay as stored.
With int4 and fp8 the embedding and output matrices are int8 (as in quant.load_field).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags

FLAGS = flags.FLAGS
# The table's reference: the dense weights rounded to bf16 (as a bf16 checkpoint stores them), computed in f32.
BF16 = "bf16"
A8 = "_a8"  # a format with int8 activations
flags.DEFINE_string("model", None, "A transformers model directory (with --perplexity_text also a GGUF; default: SmolLM2).")
flags.DEFINE_string("out", None, "The directory to write (created).")
flags.DEFINE_string("quant", "int8", "int8, int4[:group], fp8 (e4m3) or fp8_e5m2 (fp8: groups of 32).")
flags.DEFINE_string("perplexity_text", None, "Instead of writing: the perplexity of --model on this text per format.")
flags.DEFINE_list(
    "formats",
    ["none", BF16, "int8", "fp8", "fp8_e5m2", "int4", "int4:64"],
    f"--perplexity_text: weight formats (--quant values, and {BF16}: dense weights rounded to bfloat16); "
    f"a suffix {A8} also sets --int8_activations.",
)
flags.DEFINE_list("kv_dtypes", ["bfloat16", "float8_e4m3fn"], "--perplexity_text: KV cache dtypes, with dense weights.")
flags.DEFINE_integer("context", 512, "--perplexity_text: window (stride: half of it).")

_SKIP = ("model.safetensors", "model.safetensors.index.json", "config.json")


def _field_of(cfg) -> dict[str, str]:
    """Transformers tensor name -> the weights field it goes into."""
    from yalm_jax.weights import _layer_names

    fields = {"model.embed_tokens.weight": "embed", "lm_head.weight": "lm_head", "model.norm.weight": "final_norm"}
    for i in range(cfg.n_layers):
        for field, names in _layer_names(cfg, i).items():
            for name in [names] if isinstance(names, str) else names or []:
                fields[name] = field
    return fields


def write_safetensors(path: str, tensors: dict[str, "np.ndarray"]) -> None:  # noqa: F821
    """The safetensors layout: an 8-byte header length, a JSON header, then the tensors' bytes."""
    from yalm_jax.loading.hf import _DTYPES

    kinds = {v: k for k, v in _DTYPES.items()}
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": kinds[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in tensors.values():
            f.write(a.tobytes(order="C"))


def quantize_checkpoint(model_dir: str, out_dir: str, choice: str) -> dict:
    """Quantizes every matrix of `model_dir` into `out_dir`; returns the quantization section written."""
    import numpy as np

    from yalm_jax import quant
    from yalm_jax.errors import UserError
    from yalm_jax.loading.hf import open_hf_dir, read_json
    from yalm_jax.weights import expected_shapes

    fmt, group = quant.parse_choice(choice)
    if fmt in (None, "native"):
        raise UserError(f"--quant={choice}: choose a format to quantize to (int8, int4[:group], fp8, fp8_e5m2)")
    cfg, source, _ = open_hf_dir(model_dir)
    if getattr(source, "quantized", False):
        raise UserError(f"{model_dir} is quantized already")
    fields = _field_of(cfg)
    tensors, section = {}, {}
    for name, shape in expected_shapes(cfg).items():
        arr = source.get(name)
        if tuple(arr.shape) != shape:
            raise UserError(f"tensor {name} has shape {tuple(arr.shape)}, expected {shape}")
        qm = quant.load_field(choice, fields[name], [name], source, lambda n, a=arr: a, cfg.dtype, is_moe=cfg.is_moe)
        if qm is None:
            tensors[name] = np.ascontiguousarray(arr)
            continue
        section[name], parts = quant.stored_parts(qm)
        for suffix, a in parts.items():
            tensors[f"{name}.{suffix}"] = np.ascontiguousarray(a)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    config = read_json(os.path.join(model_dir, "config.json"))
    config["quantization"] = {"method": "yalm_jax", "quant": choice, "tensors": section}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    for entry in os.listdir(model_dir):
        src = os.path.join(model_dir, entry)
        if entry not in _SKIP and not entry.endswith(".safetensors") and os.path.isfile(src):
            shutil.copy2(src, os.path.join(out_dir, entry))
    return config["quantization"]


def rounded_to_bf16(weights):
    """Every tensor of `weights` rounded to bf16 and back to its own dtype."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), weights)


def perplexity_table(model_path: str, text_path: str, formats, kv_dtypes, context: int) -> list[dict]:
    """evaluate.perplexity of the model (f32 compute) with each weight format, then each KV dtype;
    printed against the bf16 row once there is one."""
    import functools

    from yalm_jax import evaluate, model, quant
    from yalm_jax.loading import load_model

    text = open(text_path, encoding="utf-8").read()
    rows, base = [], None
    init_cache = model.init_cache
    for fmt, kv in [(f, None) for f in formats] + [("none", k) for k in kv_dtypes]:
        choice = "none" if fmt == BF16 else fmt.removesuffix(A8)
        # The CPU dequantizes at load, which would leave no matrix to mark: keep them quantized for _a8.
        quant.DEQUANTIZE_ON_CPU = not fmt.endswith(A8)
        try:
            lm = load_model(model_path, quant=choice, int8_activations=fmt.endswith(A8))
        finally:
            quant.DEQUANTIZE_ON_CPU = True
        weights = rounded_to_bf16(lm.weights) if fmt == BF16 else lm.weights
        ids = lm.tokenizer.encode(text)
        # evaluate.perplexity builds its own cache; the KV dtype goes in through init_cache's dtype.
        model.init_cache = functools.partial(init_cache, dtype=kv) if kv else init_cache
        try:
            r = evaluate.perplexity(weights, lm.cfg, ids, context=context)
        finally:
            model.init_cache = init_cache
        base = r.perplexity if fmt == BF16 else base
        rows.append({"weights": fmt, "kv": kv or lm.cfg.dtype, "perplexity": r.perplexity, "tokens": r.tokens})
        vs = f" ({r.perplexity / base - 1:+.2%} vs {BF16})" if base else ""
        print(f"weights {fmt:9s} kv {kv or lm.cfg.dtype:14s} perplexity {r.perplexity:.4f}{vs}", flush=True)
    return rows


def main(argv: list[str]) -> None:
    from yalm_jax.errors import UserError

    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.perplexity_text:
        from yalm_jax.loading import default_model_path

        perplexity_table(FLAGS.model or default_model_path(), FLAGS.perplexity_text, FLAGS.formats, FLAGS.kv_dtypes, FLAGS.context)
        return
    if not FLAGS.model or not FLAGS.out:
        sys.exit("error: --model and --out are required")
    try:
        section = quantize_checkpoint(FLAGS.model, FLAGS.out, FLAGS.quant)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {FLAGS.out}: {len(section['tensors'])} matrices as {FLAGS.quant}")


if __name__ == "__main__":
    app.run(main)
