#!/usr/bin/env bash
# Make the random-weight benchmark models of issue #12 (never downloaded, never committed):
#
#   1b  Llama-3.2-1B's shape (hidden 2048, MLP 8192, 16 layers, 32/8 heads), written as F16,
#       then Q8_0 and Q4_K_M by llama-quantize;
#   7b  Llama-2-7B's shape (hidden 4096, MLP 11008, 32 layers, 32 heads), written as Q8_0 and
#       requantized to Q4_K_M by llama-quantize (the Q8_0 intermediate is removed).
#
# Both take SmolLM2-135M-Instruct's tokenizer (from the fetched GGUF), so every prompt and chat
# works. Weights are N(0, 0.02) as transformers initialises them, written tensor by tensor with
# gguf-py from the same llama.cpp tree (benches/peers/llamacpp_build.sh), so no model is ever
# held in memory whole (the 7B one is ~27 GB in f32; this machine has 24 GB).
#
#   scripts/fetch-model.sh && benches/peers/llamacpp_build.sh && scripts/make-bench-model.sh 1b [OUT_DIR]
#
# OUT_DIR defaults to models/bench (gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:?usage: scripts/make-bench-model.sh 1b|7b [OUT_DIR]}
out=${2:-models/bench}
build=${LLAMACPP:-/tmp/llamacpp}
tree="$build/llama_cpp_python-0.3.36/vendor/llama.cpp"
tok=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -x "$build/bin/llama-quantize" ] && [ -d "$tree/gguf-py" ] ||
  { echo "run benches/peers/llamacpp_build.sh first" >&2; exit 1; }
[ -s "$tok" ] || { echo "run scripts/fetch-model.sh first" >&2; exit 1; }
venv=target/bench-model-venv
[ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import numpy, yaml, tqdm, requests" 2>/dev/null ||
  { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet numpy==2.3.5 pyyaml==6.0.3 tqdm==4.67.1 requests==2.32.5; }
mkdir -p "$out"
case "$which" in
  1b) name=Llama-3.2-1B-shaped; first=F16 ;;
  7b) name=Llama-2-7B-shaped; first=Q8_0 ;;
  *) echo "unknown model $which (1b or 7b)" >&2; exit 1 ;;
esac
raw="$out/$name.$first.gguf"
if [ ! -s "$raw" ] && [ ! -s "$out/$name.Q4_K_M.gguf" ]; then
  PYTHONPATH="$tree/gguf-py" "$venv/bin/python" - "$which" "$tok" "$raw.part" <<'PY'
import sys
import numpy as np
import gguf

which, tok_path, dest = sys.argv[1:]
if which == "1b":
    hidden, ffn, layers, heads, kv, ctx, theta, tied, qtype = 2048, 8192, 16, 32, 8, 8192, 500000.0, True, gguf.GGMLQuantizationType.F16
else:
    hidden, ffn, layers, heads, kv, ctx, theta, tied, qtype = 4096, 11008, 32, 32, 32, 4096, 10000.0, False, gguf.GGMLQuantizationType.Q8_0
src = gguf.GGUFReader(tok_path)
vocab = len(src.fields["tokenizer.ggml.tokens"].data)
w = gguf.GGUFWriter(dest, "llama")
w.add_name(f"random {which} (dora-serve benchmark)")
w.add_context_length(ctx)
w.add_embedding_length(hidden)
w.add_feed_forward_length(ffn)
w.add_block_count(layers)
w.add_head_count(heads)
w.add_head_count_kv(kv)
w.add_rope_dimension_count(hidden // heads)
w.add_rope_freq_base(theta)
w.add_layer_norm_rms_eps(1e-5)
w.add_vocab_size(vocab)
w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == gguf.GGMLQuantizationType.F16 else gguf.LlamaFileType.MOSTLY_Q8_0)
for key, field in src.fields.items():
    if not key.startswith("tokenizer."):
        continue
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
    else:
        w.add_key_value(key, field.contents(), vtype)

shapes = [("token_embd.weight", (vocab, hidden))]
for l in range(layers):
    shapes += [(f"blk.{l}.attn_norm.weight", (hidden,)), (f"blk.{l}.ffn_norm.weight", (hidden,)),
               (f"blk.{l}.attn_q.weight", (hidden, hidden)), (f"blk.{l}.attn_k.weight", (kv * hidden // heads, hidden)),
               (f"blk.{l}.attn_v.weight", (kv * hidden // heads, hidden)), (f"blk.{l}.attn_output.weight", (hidden, hidden)),
               (f"blk.{l}.ffn_gate.weight", (ffn, hidden)), (f"blk.{l}.ffn_up.weight", (ffn, hidden)),
               (f"blk.{l}.ffn_down.weight", (hidden, ffn))]
shapes.append(("output_norm.weight", (hidden,)))
if not tied:
    shapes.append(("output.weight", (vocab, hidden)))

def kind(shape):
    return gguf.GGMLQuantizationType.F32 if len(shape) == 1 else qtype

for name, shape in shapes:
    t = kind(shape)
    # Stored shape: the quantized byte shape gguf-py expects for raw types.
    nbytes = gguf.quants.quant_shape_to_byte_shape(shape, t)[-1] * int(np.prod(shape[:-1])) if t != gguf.GGMLQuantizationType.F32 else 4 * int(np.prod(shape))
    dtype = np.float32 if t == gguf.GGMLQuantizationType.F32 else (np.float16 if t == gguf.GGMLQuantizationType.F16 else np.uint8)
    # gguf-py takes a quantized tensor's shape in bytes (it derives the values' shape).
    stored = gguf.quants.quant_shape_to_byte_shape(shape, t) if dtype == np.uint8 else shape
    w.add_tensor_info(name, stored, np.dtype(dtype), nbytes, raw_dtype=t)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_ti_data_to_file()
rng = np.random.default_rng(0)
for i, (name, shape) in enumerate(shapes):
    t = kind(shape)
    if t == gguf.GGMLQuantizationType.F32:
        w.write_tensor_data(np.ones(shape, dtype=np.float32))
        continue
    rows = []
    step = max(1, (1 << 24) // shape[1])
    data = np.empty(gguf.quants.quant_shape_to_byte_shape(shape, t) if t != gguf.GGMLQuantizationType.F16 else shape,
                    dtype=np.uint8 if t != gguf.GGMLQuantizationType.F16 else np.float16)
    for r in range(0, shape[0], step):
        x = rng.standard_normal((min(step, shape[0] - r), shape[1]), dtype=np.float32) * np.float32(0.02)
        data[r:r + x.shape[0]] = x.astype(np.float16) if t == gguf.GGMLQuantizationType.F16 else gguf.quants.quantize(x, t)
    w.write_tensor_data(data)
    print(f"\r{i + 1}/{len(shapes)} tensors", end="", file=sys.stderr, flush=True)
w.close()
print(file=sys.stderr)
PY
  mv "$raw.part" "$raw"
fi
for q in Q8_0 Q4_K_M; do
  f="$out/$name.$q.gguf"
  [ -s "$f" ] || [ "$q" = "$first" ] || "$build/bin/llama-quantize" --allow-requantize "$raw" "$f" "$q" >/dev/null
done
[ "$which" = 7b ] && rm -f "$raw"
ls -la "$out"/$name.*.gguf
