#!/usr/bin/env python3
"""The 8-adapter workload of benches/scenarios.sh on HF transformers + PEFT, on the same CPU.

PEFT cannot batch different DoRA adapters together (mixed `adapter_names` batches refuse DoRA),
so it serves them as PEFT allows: 8 clients keep one request each outstanding; each round takes
the 8 waiting requests, groups them by adapter, and for each group calls `set_adapter` and
`generate` on that group as one batch (greedy, exactly TOKENS new tokens). Output tokens/s is
all generated tokens over the wall time of the rounds after the first (warm-up).

    /path/to/venv/bin/python benches/peers/peft_bench.py [ROUNDS]   # torch, transformers, peft, gguf

Reads target/bench-store/ad-0 … ad-7 (written by benches/scenarios.sh) and the fetched GGUF;
writes benches/data/peft.json, which benches/report.py turns into the dora-serve ÷ PEFT ratio.
"""
import json
import os
import random
import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
TOKENS = int(os.environ.get("TOKENS", 64))
STREAMS = 8
WORDS = "the of and to in is was for on that with as it by at from his an were are which this be or has".split()

torch.set_num_threads(os.cpu_count() or 1)
torch.manual_seed(0)
models = os.path.join(ROOT, "models")
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(models, gguf_file=gguf)
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
base = AutoModelForCausalLM.from_pretrained(models, gguf_file=gguf, dtype=torch.float32)
store = os.path.join(ROOT, "target", "bench-store")
names = [f"ad-{i}" for i in range(8)]
model = PeftModel.from_pretrained(base, os.path.join(store, names[0]), adapter_name=names[0])
for n in names[1:]:
    model.load_adapter(os.path.join(store, n), adapter_name=n)
model.eval()

rng = random.Random(0)


def request():
    return rng.choice(names), " ".join(rng.choice(WORDS) for _ in range(16))


pending = [request() for _ in range(STREAMS)]
generated, start = 0, None
for round_ in range(ROUNDS + 1):
    if round_ == 1:
        generated, start = 0, time.perf_counter()
    groups = {}
    for name, prompt in pending:
        groups.setdefault(name, []).append(prompt)
    for name, prompts in groups.items():
        model.set_adapter(name)
        batch = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        generated += (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    pending = [request() for _ in range(STREAMS)]
    print(f"round {round_}: {len(groups)} adapter groups", flush=True)
secs = time.perf_counter() - start
result = {
    "command": "benches/peers/peft_bench.py" + (f" {ROUNDS}" if len(sys.argv) > 1 else ""),
    "output_tokens_per_s": generated / secs,
    "tokens": generated,
    "seconds": secs,
    "how": f"PEFT {__import__('peft').__version__}, set_adapter + generate per adapter group, {STREAMS} streams",
}
json.dump(result, open(os.path.join(ROOT, "benches", "data", "peft.json"), "w"), indent=1)
print(result)
