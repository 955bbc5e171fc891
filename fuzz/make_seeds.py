#!/usr/bin/env python3
"""Seed corpora for the fuzz targets, from the committed test fixtures (no torch needed).

adapter_load: u16 little-endian config length, adapter_config.json, adapter_model.safetensors.
completions_body: request bodies that reach every branch of the completions handler.
"""
import json
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))
fixtures = os.path.join(here, "..", "tests", "fixtures", "adapters")

out = os.path.join(here, "corpus", "adapter_load")
os.makedirs(out, exist_ok=True)
for name in sorted(os.listdir(fixtures)):
    d = os.path.join(fixtures, name)
    if not os.path.isdir(d):
        continue
    cfg = open(os.path.join(d, "adapter_config.json"), "rb").read()
    st = open(os.path.join(d, "adapter_model.safetensors"), "rb").read()
    # A compact config keeps the seed small and under the u16 length.
    cfg = json.dumps(json.loads(cfg), separators=(",", ":")).encode()
    open(os.path.join(out, name), "wb").write(struct.pack("<H", len(cfg)) + cfg + st)

bodies = [
    {"prompt": "Hello", "max_tokens": 4},
    {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "adapter": "dora-all-r8"},
    {"prompt": ["a", "b"], "n": 2, "max_tokens": 2, "seed": 7, "temperature": 0.8, "top_p": 0.9, "top_k": 5},
    {"prompt": [1, 2, 3], "max_tokens": 2, "logprobs": 2, "echo": True},
    {"prompt": [[1, 2], [3]], "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}},
    {"prompt": "x", "max_tokens": 5, "stop": ["\n", "ab"], "ignore_eos": True, "presence_penalty": 0.5, "frequency_penalty": -0.5},
    {"prompt": "x", "model": "lora-r8", "max_tokens": 2},
    {"prompt": "x", "max_tokens": 300},
    {"prompt": "x", "temperature": -1},
]
out = os.path.join(here, "corpus", "completions_body")
os.makedirs(out, exist_ok=True)
for i, b in enumerate(bodies):
    open(os.path.join(out, f"seed{i}.json"), "w").write(json.dumps(b))
