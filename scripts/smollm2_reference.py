#!/usr/bin/env python3
"""Record HF transformers' view of a real GGUF model, for the ignored real-model tests.

    scripts/fetch-model.sh [gemma3-270m]
    /path/to/venv/bin/python scripts/smollm2_reference.py [gemma3-270m]   # needs torch, transformers, gguf

transformers dequantises the GGUF to an f32 HF checkpoint and converts its tokenizer; this
writes tests/fixtures/smollm2_reference.json (or gemma3_270m_reference.json) with token ids
of a few prompts, a greedy continuation of each, and the top last-position logits of each
prompt.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = os.path.join(ROOT, "models")
COMMON = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "  Leading spaces, tabs\tand\nnewlines; numbers 12345 and 3.14; émigré café 日本語 🙂!",
]
MODELS_KNOWN = {
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2_reference.json", "<|im_end|>",
                COMMON + ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]),
    "gemma3-270m": ("gemma-3-270m-q4_k_m.gguf", "gemma3_270m_reference.json", "<end_of_turn>",
                    COMMON + ["مرحبا بالعالم، كيف حالك؟    \n\n\tx = [i**2 for i in range(10)]",
                              "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"]),
}
WHICH = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
GGUF, OUT, EOS, PROMPTS = MODELS_KNOWN[WHICH]
NEW_TOKENS = 24


@torch.no_grad()
def main():
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    eos = tok.convert_tokens_to_ids(EOS)
    out = {"model": GGUF, "eos_token_id": eos, "prompts": []}
    for p in PROMPTS:
        ids = tok(p, add_special_tokens=True)["input_ids"]
        x = torch.tensor([ids])
        logits = model(x).logits[0, -1].float()
        top = torch.topk(logits, 10)
        gen = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=eos, pad_token_id=eos,
        )[0, len(ids):].tolist()
        out["prompts"].append({
            "prompt": p,
            "prompt_token_ids": ids,
            "last_top_ids": top.indices.tolist(),
            "last_top_logits": top.values.tolist(),
            "greedy_token_ids": gen,
            "greedy_text": tok.decode(gen, skip_special_tokens=True),
        })
        print(repr(p), "->", repr(out["prompts"][-1]["greedy_text"]))
    with open(os.path.join(ROOT, "tests", "fixtures", OUT), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
