#!/usr/bin/env python3
"""HF's ids for one more sample on llama.cpp's test vocabularies: Arabic, code, emoji, CJK,
whitespace runs and special tokens written in the text (llama.cpp's own test texts have no
Arabic and no special tokens). transformers builds each tokenizer from the GGUF file as it does
for any GGUF model (gguf_file=).

Text right after a special token is left out for the SentencePiece vocabularies' mid-text
specials: there the original tokenizer.json of Llama 2 (the legacy rule dora-serve follows,
which llama.cpp's .out files agree with on plain text) prepends a ▁ to every segment, while
transformers' GGUF conversion prepends it to the first only.

    scripts/fetch-model.sh vocab
    /path/to/venv/bin/python scripts/vocab_reference.py   # needs transformers, gguf, sentencepiece

Writes tests/fixtures/vocab_reference.json.
"""
import json
import os

from transformers import AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VOCAB = os.path.join(ROOT, "models", "vocab")
SAMPLES = {
    "llama-spm": "مرحبا بالعالم! def f(x):\n    return x**2  # 日本語 🙂\t\tend</s>",
    "phi-3": "<|user|>\nمرحبا بالعالم! def f(x):\n    return x**2  # 日本語 🙂<|end|>\n<|assistant|>",
    "qwen2": "<|im_start|>user\nمرحبا بالعالم! def f(x):\n    return x**2  # 日本語 🙂\t\t<|im_end|>",
}


def main():
    out = {}
    for name, text in SAMPLES.items():
        tok = AutoTokenizer.from_pretrained(VOCAB, gguf_file=f"ggml-vocab-{name}.gguf")
        ids = tok.encode(text, add_special_tokens=False)
        out[name] = {"text": text, "ids": ids}
        print(name, ids)
    with open(os.path.join(ROOT, "tests", "fixtures", "vocab_reference.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
