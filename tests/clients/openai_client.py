#!/usr/bin/env python3
"""A real client against dora-serve: the official `openai` package, as users call it.

    python tests/clients/openai_client.py http://127.0.0.1:PORT/v1

Runs completions, streaming, chat (plain and streamed), models, an adapter passed through
extra_body and through `model`, and an error case; exits non-zero on the first mismatch.
"""
import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused")
failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + (f": {detail}" if detail and not cond else ""))
    if not cond:
        failures.append(name)


models = client.models.list()
ids = [m.id for m in models.data]
check("models lists the base model and the adapters", "tiny-llama" in ids and "dora-all-r8" in ids, ids)

c = client.completions.create(model="tiny-llama", prompt="The capital of France is", max_tokens=6, temperature=0)
check("completion", c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 6, c)
base_text = c.choices[0].text

a = client.completions.create(model="tiny-llama", prompt="The capital of France is", max_tokens=6, temperature=0,
                              extra_body={"adapter": "dora-all-r8"})
check("adapter through extra_body changes the output", a.choices[0].text != base_text, (a.choices[0].text, base_text))
m = client.completions.create(model="dora-all-r8", prompt="The capital of France is", max_tokens=6, temperature=0)
check("adapter named by model equals extra_body", m.choices[0].text == a.choices[0].text)

streamed = "".join(ch.choices[0].text for ch in client.completions.create(
    model="tiny-llama", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True) if ch.choices)
check("streamed completion equals the plain one", streamed == base_text, (streamed, base_text))

chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi there"}],
                                      max_tokens=5, temperature=0, extra_body={"adapter": "lora-r8"})
check("chat", chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1, chat)
parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
    model="tiny-llama", messages=[{"role": "user", "content": "Hi there"}], max_tokens=5, temperature=0,
    stream=True, extra_body={"adapter": "lora-r8"}) if ch.choices]
check("streamed chat equals the plain one", "".join(parts) == chat.choices[0].message.content)

try:
    client.completions.create(model="tiny-llama", prompt="x", max_tokens=4, extra_body={"adapter": "no-such-adapter"})
    check("unknown adapter is a 404", False, "no error raised")
except openai.NotFoundError as e:
    check("unknown adapter is a 404", e.status_code == 404 and e.body.get("code") == "adapter_not_found", e.body)

try:
    client.completions.create(model="tiny-llama", prompt="x", max_tokens=4, temperature=-1)
    check("bad temperature is a 400", False, "no error raised")
except openai.BadRequestError as e:
    check("bad temperature is a 400", e.status_code == 400 and e.body.get("param") == "temperature", e.body)

print(f"{9 - len(failures)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
