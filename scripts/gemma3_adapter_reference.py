#!/usr/bin/env python3
"""A PEFT DoRA adapter on the real Gemma 3 270M, and PEFT's greedy answers with it, for the
ignored real-model test that serves it through the HTTP API.

    scripts/fetch-model.sh gemma3-270m
    /path/to/venv/bin/python scripts/gemma3_adapter_reference.py   # needs torch, transformers, peft, gguf

Writes tests/fixtures/gemma3_270m_dora/ (DoRA r4 on q, k, v, o of every layer; lora_B and the
magnitudes randomised, so every term of the DoRA formula matters) and
tests/fixtures/gemma3_270m_adapter_reference.json (prompt ids and greedy tokens, base and
adapter, as transformers/PEFT compute them on the dequantised GGUF).
"""
import json
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = os.path.join(ROOT, "models")
GGUF = "gemma-3-270m-q4_k_m.gguf"
OUT = os.path.join(ROOT, "tests", "fixtures", "gemma3_270m_dora")
PROMPTS = ["The capital of France is", "My favourite recipe for soup"]
NEW_TOKENS = 16


@torch.no_grad()
def greedy(model, ids):
    x = torch.tensor([ids])
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=[1, 106], pad_token_id=0)[0, len(ids):].tolist()


def main():
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=GGUF, dtype=torch.float32).eval()
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    base = [greedy(model, i) for i in ids]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for _, module in peft.named_modules():
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                m = module.lora_magnitude_vector["default"].weight
                m.copy_(m * (1 + 0.1 * torch.randn(m.shape, generator=g)))
    peft.eval()
    peft.save_pretrained(OUT)
    adapted = [greedy(peft, i) for i in ids]
    for p, b, a in zip(PROMPTS, base, adapted):
        print(repr(p), "base:", repr(tok.decode(b)), "adapter:", repr(tok.decode(a)))
    with open(os.path.join(ROOT, "tests", "fixtures", "gemma3_270m_adapter_reference.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "prompt_token_ids": ids, "base": base, "adapter": adapted,
                   "adapter_text": [tok.decode(a, skip_special_tokens=True) for a in adapted]}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
