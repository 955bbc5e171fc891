#!/usr/bin/env python3
"""Train the two small example DoRA adapters under adapters/ on SmolLM2-135M-Instruct.

    scripts/fetch-model.sh
    /path/to/venv/bin/python scripts/train_example_adapters.py   # torch, transformers, peft, gguf

Both adapters are trained with HF PEFT on the HF form of the model (transformers dequantises the
GGUF that scripts/fetch-model.sh fetches), so they line up with the base dora-serve serves.
Each has a style you can see at once:
  adapters/shouty  answers in capitals         (DoRA r8 on all seven projections)
  adapters/pirate  answers like a pirate       (DoRA r8 on q, k, v, o)
The training data is the base model's own greedy answers to a fixed list of questions, rewritten
in each style, so nothing is downloaded. It takes a few minutes on a 2-core CPU. The script also
records PEFT's greedy answers with each adapter (tests/fixtures/smollm2_adapters_reference.json)
for the real-model parity test.
"""
import json
import os
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = os.path.join(ROOT, "models")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "What is the capital of France?", "How do plants make food?", "Why is the sky blue?",
    "What is a computer?", "How many legs does a spider have?", "What is water made of?",
    "Who wrote Romeo and Juliet?", "What is the largest ocean?", "How does a rainbow form?",
    "What do bees make?", "What is the speed of light?", "Why do we sleep?",
    "What is a volcano?", "How far is the moon?", "What is gravity?", "What is a prime number?",
    "How do birds fly?", "What is the tallest mountain?", "What causes wind?", "What is an atom?",
    "Why do leaves change color?", "What is electricity?", "How do fish breathe?",
    "What is the sun made of?", "What is a noun?", "How do vaccines work?", "What is a desert?",
    "Why is the ocean salty?", "What is photosynthesis?", "How do magnets work?",
    "What is a galaxy?", "What is the boiling point of water?", "Give me a tip for studying.",
    "Describe a cat.", "What should I eat for breakfast?", "Tell me about the weather.",
    "How do I make tea?", "What is your favorite color?", "Say hello to my friend.",
    "What is music?",
]
HELD_OUT = ["What is the capital of Italy?", "How do trains work?", "Tell me about dogs."]
PIRATE = [(r"\byou\b", "ye"), (r"\bYou\b", "Ye"), (r"\byour\b", "yer"), (r"\bmy\b", "me"),
          (r"\bis\b", "be"), (r"\bare\b", "be"), (r"\bthe\b", "th'"), (r"\bThe\b", "Th'"),
          (r"\bhello\b", "ahoy"), (r"\bHello\b", "Ahoy"), (r"\bfriend\b", "matey")]
STYLES = {
    "shouty": dict(rewrite=lambda a: a.upper(), targets=["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"]),
    "pirate": dict(rewrite=lambda a: "Arr! " + pirate(a) + " Yo ho!", targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def pirate(text):
    for pat, rep in PIRATE:
        text = re.sub(pat, rep, text)
    return text


def chat(tok, q):
    return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def greedy(model, tok, prompt, n=48):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:]
    return out.tolist()


def main():
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=GGUF)
    load = lambda: AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=GGUF, dtype=torch.float32).eval()
    base = load()
    answers = [tok.decode(greedy(base, tok, chat(tok, q)), skip_special_tokens=True).strip() for q in QUESTIONS]
    reference = {"model": GGUF, "prompts": [chat(tok, q) for q in HELD_OUT + QUESTIONS[:2]], "adapters": {}}
    for name, style in STYLES.items():
        model = get_peft_model(load(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True,
                                                  target_modules=style["targets"], task_type="CAUSAL_LM"))
        examples = []
        for q, a in zip(QUESTIONS, answers):
            prompt = tok(chat(tok, q))["input_ids"]
            target = tok(style["rewrite"](a) + "<|im_end|>")["input_ids"]
            examples.append((prompt, target))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        model.train()
        for step in range(120):
            batch = [examples[(step * 4 + j) % len(examples)] for j in range(4)]
            width = max(len(p) + len(t) for p, t in batch)
            ids = torch.full((4, width), tok.convert_tokens_to_ids("<|im_end|>"))
            labels = torch.full((4, width), -100)
            mask = torch.zeros((4, width), dtype=torch.long)
            for j, (p, t) in enumerate(batch):
                seq = p + t
                ids[j, :len(seq)] = torch.tensor(seq)
                labels[j, len(p):len(seq)] = torch.tensor(t)
                mask[j, :len(seq)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 20 == 0 or step == 119:
                print(f"{name} step {step} loss {loss.item():.3f}", flush=True)
        model.eval()
        out_dir = os.path.join(ROOT, "adapters", name)
        model.save_pretrained(out_dir)
        # Keep the committed files small and machine-independent.
        readme = os.path.join(out_dir, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        cfg_path = os.path.join(out_dir, "adapter_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        # Store in f16 (a few MB); PEFT loads them back into the f32 model unchanged.
        st = os.path.join(out_dir, "adapter_model.safetensors")
        save_file({k: v.half().contiguous() for k, v in load_file(st).items()}, st)
        # PEFT's own answers with the saved adapter, for the parity test.
        peft_model = PeftModel.from_pretrained(load(), out_dir).eval()
        reference["adapters"][name] = [greedy(peft_model, tok, p) for p in reference["prompts"]]
        for p, ids in zip(reference["prompts"], reference["adapters"][name]):
            print(name, repr(p[-40:]), "->", repr(tok.decode(ids, skip_special_tokens=True)), flush=True)
    reference["base"] = [greedy(base, tok, p) for p in reference["prompts"]]
    with open(os.path.join(ROOT, "tests", "fixtures", "smollm2_adapters_reference.json"), "w") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
