"""Checks of several replicas on one S3 adapter store, behind HAProxy (run by run.sh).

Every check raises on failure; the figures go to a Markdown report. Standard library only,
plus prometheus_client's text parser for the metrics conformance check.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families

FIX = "tests/fixtures/adapters"
REFRESH_BOUND = 1.0  # --adapter-refresh given to the replicas
PROMPT = [1, 5, 9, 13, 2, 7]


def request(method, url, body=None, headers=None, timeout=60):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def jget(url):
    status, body, _ = request("GET", url)
    return status, (json.loads(body) if body.startswith(b"{") else body)


def upload(base, name, adapter, replace=False):
    boundary = uuid.uuid4().hex
    parts = [("name", None, name.encode())]
    for field, file in [("adapter_config", "adapter_config.json"), ("adapter_model", "adapter_model.safetensors")]:
        with open(f"{FIX}/{adapter}/{file}", "rb") as f:
            parts.append((field, file, f.read()))
    body = b""
    for field, file, data in parts:
        disp = f'form-data; name="{field}"' + (f'; filename="{file}"' if file else "")
        body += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    url = f"{base}/v1/adapters" + ("?replace=true" if replace else "")
    status, resp, _ = request("POST", url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, json.loads(resp)


def complete(base, model, max_tokens=6, timeout=60):
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
    status, resp, _ = request("POST", f"{base}/v1/completions", body, {"Content-Type": "application/json"}, timeout)
    return status, json.loads(resp) if resp.startswith(b"{") else resp


def served(base, model):
    """(text, adapter_digest) of a greedy completion; raises unless 200."""
    status, r = complete(base, model)
    assert status == 200, (base, model, status, r)
    return r["choices"][0]["text"], r.get("adapter_digest")


def metrics(base):
    status, body, _ = request("GET", f"{base}/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(fams, name):
    fam = fams[name]
    return sum(s.value for s in fam.samples if not s.name.endswith("_created"))


def wait_until(what, pred, timeout):
    start = time.time()
    while time.time() - start < timeout:
        v = pred()
        if v:
            return time.time() - start
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Run:
    def __init__(self, a):
        self.a = a
        self.r = dict(x.split("=", 1) for x in a.replica)
        self.report = []

    def note(self, line):
        print(line, flush=True)
        self.report.append(line)

    def pid(self, name):
        with open(f"{self.a.work}/{name}.pid") as f:
            return int(f.read())

    # -- 1. upload on one replica, serve on the others ----------------------------------
    def upload_then_serve_elsewhere(self):
        status, up = upload(self.r["r1"], "shared", "dora-all-r8")
        assert status in (200, 201), up
        digest = up["digest"]
        texts = set()
        for name in ("r1", "r2", "r3"):
            text, d = served(self.r[name], "shared")
            assert d == digest, (name, d, digest)
            texts.add(text)
        assert len(texts) == 1, texts
        base_text, _ = served(self.r["r2"], "tiny-llama")
        assert base_text not in texts, "the adapter changes the greedy text"
        self.note(f"- upload on r1, served by r2 and r3 at once (lookup on a miss): digest {digest[:19]}…, same text on all three")
        return digest

    # -- 2. replace on one replica, seen by the others within the refresh bound ----------
    def replace_is_seen(self, old):
        for name in ("r1", "r3"):
            assert served(self.r[name], "shared")[1] == old  # cached in memory there
        t0 = time.time()
        status, up = upload(self.r["r2"], "shared", "lora-r8", replace=True)
        assert status in (200, 201), up
        new = up["digest"]
        assert new != old
        seen = {}
        for name in ("r1", "r3"):
            wait_until(f"{name} to serve the replaced version",
                       lambda: served(self.r[name], "shared")[1] == new, REFRESH_BOUND + 3)
            seen[name] = time.time() - t0
        bound = REFRESH_BOUND + 1.5
        assert all(v <= bound for v in seen.values()), seen
        self.note(f"- replace on r2 seen by r1 after {seen['r1']:.2f} s and r3 after {seen['r3']:.2f} s (refresh {REFRESH_BOUND} s; bound checked {bound} s)")
        return new

    # -- 3. concurrent replaces: one whole version wins ----------------------------------
    def concurrent_replaces(self):
        # Deterministic race: p1 and p2 pause 2 s between their version objects and their
        # manifest, so both read the same manifest and exactly one conditional put lands.
        status, up = upload(self.r["r1"], "raced", "dora-all-r8")
        assert status in (200, 201), up
        with ThreadPoolExecutor(2) as ex:
            f1 = ex.submit(upload, self.r["p1"], "raced", "lora-r8", True)
            time.sleep(0.3)
            f2 = ex.submit(upload, self.r["p2"], "raced", "dora-layer1", True)
            res = [f1.result(), f2.result()]
        codes = sorted(s for s, _ in res)
        assert codes[0] in (200, 201) and codes[1] == 409, res
        loser = [r for s, r in res if s == 409][0]
        assert loser["error"]["code"] == "adapter_conflict", loser
        winner = [r for s, r in res if s != 409][0]["digest"]
        time.sleep(REFRESH_BOUND + 1)
        for name in ("r1", "r2", "r3", "p1", "p2"):
            assert served(self.r[name], "raced")[1] == winner, name
        # Unpaused replicas racing freely, 8 rounds: each round ends on exactly one of the
        # two versions everywhere, whole (the digest is checked at every fetch).
        conflicts = 0
        for i in range(8):
            pair = ("dora-patterns", "lora-r8") if i % 2 else ("lora-r8", "dora-patterns")
            with ThreadPoolExecutor(2) as ex:
                fa = ex.submit(upload, self.r["r1"], "raced", pair[0], True)
                fc = ex.submit(upload, self.r["r3"], "raced", pair[1], True)
                res = [fa.result(), fc.result()]
            ok = [r["digest"] for s, r in res if s in (200, 201)]
            conflicts += sum(1 for s, r in res if s == 409 and r["error"]["code"] == "adapter_conflict")
            assert ok and all(s in (200, 201, 409) for s, _ in res), res
            time.sleep(REFRESH_BOUND + 0.6)
            digests = {served(self.r[n], "raced")[1] for n in ("r1", "r2", "r3")}
            assert len(digests) == 1 and digests.pop() in ok, (digests, ok)
        self.note(f"- concurrent replaces: paused p1/p2 race → one 2xx, one 409 adapter_conflict, all replicas serve the winner; r1/r3 free race × 8 → one version everywhere each round ({conflicts} conflicts told)")

    # -- 4. a writer killed mid-upload leaves nothing visible ----------------------------
    def kill_mid_upload(self):
        before = served(self.r["r1"], "raced")[1]
        def doomed(*args):
            try:
                upload(self.r["p1"], *args)
            except OSError:
                pass  # the connection dies with p1

        t_new = threading.Thread(target=doomed, args=("half-new", "lora-r8"), daemon=True)
        t_rep = threading.Thread(target=doomed, args=("raced", "dora-layer1", True), daemon=True)
        t_new.start(); t_rep.start()
        time.sleep(1.0)  # inside the 2 s pause: version objects written, manifests not
        os.kill(self.pid("p1"), signal.SIGKILL)
        time.sleep(REFRESH_BOUND + 1)
        for name in ("r1", "r2", "r3"):
            st, _ = jget(f"{self.r[name]}/v1/adapters/half-new")
            assert st == 404, (name, st)
            assert served(self.r[name], "raced")[1] == before, name
        self.note("- kill -9 of a writer mid-upload (new name and replace): the new name never appears, the replaced one keeps its old version on every replica")

    # -- 5. the store goes away and comes back -------------------------------------------
    def store_outage(self):
        r1 = self.r["r1"]
        # Known on r1 (through refresh) but never loaded there, nor on its disk.
        assert upload(self.r["r2"], "cold", "dora-layer1")[0] in (200, 201)
        wait_until("r1 to list cold", lambda: jget(f"{r1}/v1/adapters/cold")[0] == 200, REFRESH_BOUND + 3)
        # Cached on r1's disk but dropped from its memory: the disk tier serves it.
        hot_digest = served(r1, "shared")[1]
        assert upload(self.r["r1"], "disk-only", "dora-patterns")[0] in (200, 201)
        disk_digest = served(r1, "disk-only")[1]
        st, _, _ = request("POST", f"{r1}/v1/unload_lora_adapter", json.dumps({"lora_name": "disk-only"}).encode(), {"Content-Type": "application/json"})
        assert st == 200, st
        with open(f"{self.a.work}/weed.pid") as f:
            os.kill(int(f.read()), signal.SIGKILL)
        time.sleep(0.5)
        assert served(r1, "shared")[1] == hot_digest
        assert served(r1, "disk-only")[1] == disk_digest
        status, r = complete(r1, "cold")
        assert status == 503 and r["error"]["code"] == "adapter_store_unavailable", (status, r)
        status, up = upload(r1, "during-outage", "lora-r8")
        assert status == 503 and up["error"]["code"] == "adapter_store_unavailable", (status, up)
        assert self.a.secret not in json.dumps(up) and self.a.secret not in json.dumps(r)
        assert jget(f"{r1}/health")[0] == 200
        wait_until("r1 /ready to say 503", lambda: jget(f"{r1}/ready")[0] == 503, REFRESH_BOUND + 3)
        st, ready = jget(f"{r1}/ready")
        assert ready["adapter_store"]["up"] is False, ready
        weed = subprocess.Popen([f"{self.a.work}/weed.sh"])
        with open(f"{self.a.work}/weed.pid", "w") as f:
            f.write(str(weed.pid))
        recovered = wait_until("r1 /ready to recover", lambda: jget(f"{r1}/ready")[0] == 200, 90)
        # A restarted SeaweedFS takes writes only once its volume server has registered again
        # (until then SeaweedFS answers a PUT with 500, after retrying inside for 30 s).
        wait_until("uploads to work again", lambda: upload(r1, "after-outage", "lora-r8")[0] in (200, 201), 90)
        assert complete(r1, "cold")[0] == 200
        fams = metrics(r1)
        assert value(fams, "dora_adapter_store_up") == 1
        self.note(f"- object store killed: cached (memory and disk tier) adapters kept serving, an uncached one and an upload got 503 adapter_store_unavailable, /health 200 and /ready 503; restarted, r1 was ready again {recovered:.1f} s later and served the uncached adapter")

    # -- 6. HAProxy: affinity, and adapter loads per 1000 requests ------------------------
    def unload_everywhere(self, names):
        for r in ("r1", "r2", "r3"):
            for n in names:
                request("POST", f"{self.r[r]}/v1/unload_lora_adapter", json.dumps({"lora_name": n}).encode(), {"Content-Type": "application/json"})

    def loads(self):
        return {r: value(metrics(self.r[r]), "dora_adapter_loads") for r in ("r1", "r2", "r3")}

    def zipf_run(self, proxy, names, n, seed):
        rng = random.Random(seed)
        weights = [1.0 / (k + 1) for k in range(len(names))]
        picks = rng.choices(names, weights, k=n)
        before = self.loads()
        with ThreadPoolExecutor(4) as ex:
            res = list(ex.map(lambda m: complete(proxy, m, max_tokens=2)[0], picks))
        assert all(s == 200 for s in res), [s for s in res if s != 200][:5]
        after = self.loads()
        return sum(after[r] - before[r] for r in after), {r: after[r] - before[r] for r in after}

    def affinity(self):
        names = [f"z{k:02d}" for k in range(20)]
        for n in names:
            assert upload(self.r["p2"], n, "dora-all-r8")[0] in (200, 201)
        time.sleep(REFRESH_BOUND + 1)
        self.unload_everywhere(names)
        # One adapter's requests land on one replica: 10 requests each for 6 adapters.
        for n in names[:6]:
            before = self.loads()
            for _ in range(10):
                assert complete(self.a.proxy, n, max_tokens=2)[0] == 200
            after = self.loads()
            delta = {r: after[r] - before[r] for r in after}
            assert sum(delta.values()) == 1 and max(delta.values()) == 1, (n, delta)
        self.note("- through HAProxy, each of 6 adapters × 10 requests was loaded on exactly one replica (from the replicas' dora_adapter_loads_total)")
        rows = []
        for rnd in range(3):
            for label, proxy in (("hash", self.a.proxy), ("roundrobin", self.a.proxy_rr)):
                self.unload_everywhere(names)
                total, per = self.zipf_run(proxy, names, 1000, seed=rnd)
                rows.append((rnd, label, total, per))
        self.report.append("\n| round | HAProxy balance | adapter loads per 1000 requests | per replica |\n|---|---|---|---|")
        for rnd, label, total, per in rows:
            self.report.append(f"| {rnd + 1} | {label} | {total:.0f} | {' / '.join(f'{v:.0f}' for v in per.values())} |")
        med = lambda lab: sorted(t for _, l, t, _ in rows if l == lab)[1]
        self.note(f"\nZipf 1.0 over 20 adapters, 1000 requests, 4 concurrent, adapter cache 400 KiB per replica: median loads per 1000 requests, hash {med('hash'):.0f} vs round robin {med('roundrobin'):.0f}")
        assert med("hash") < med("roundrobin"), rows

    # -- 7. metrics conformance under mixed-adapter load ---------------------------------
    def metrics_conformance(self):
        r1 = self.r["r1"]
        names = ["shared", "raced", "cold", "disk-only"]
        stop = threading.Event()

        def load(i):
            while not stop.is_set():
                complete(r1, names[i % len(names)], max_tokens=24)

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        seen_running, seen_waiting, scrapes = set(), set(), 0
        types = {"vllm:num_requests_waiting": "gauge", "vllm:num_requests_running": "gauge",
                 "vllm:kv_cache_usage_perc": "gauge", "vllm:lora_requests_info": "gauge",
                 "dora_adapter_loads": "counter", "dora_requests": "counter",
                 "dora_time_to_first_token_seconds": "histogram", "dora_adapter_store_up": "gauge"}
        end = time.time() + 4
        while time.time() < end:
            fams = metrics(r1)
            scrapes += 1
            for name, kind in types.items():
                assert name in fams and fams[name].type == kind, (name, fams.get(name) and fams[name].type)
            kv = value(fams, "vllm:kv_cache_usage_perc")
            assert 0.0 <= kv <= 1.0, kv
            (info,) = fams["vllm:lora_requests_info"].samples
            assert set(info.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}, info.labels
            assert info.labels["max_lora"] == "4"
            assert time.time() - 3600 < info.value <= time.time() + 1, info.value
            run = [x for x in info.labels["running_lora_adapters"].split(",") if x]
            wait = [x for x in info.labels["waiting_lora_adapters"].split(",") if x]
            assert set(run) <= set(names) and set(wait) <= set(names), info.labels
            assert len(run) == len(set(run)) and len(wait) == len(set(wait)), info.labels
            running = value(fams, "vllm:num_requests_running")
            assert running <= 4 and (running > 0 or not run), (running, run)
            seen_running |= set(run); seen_waiting |= set(wait)
        stop.set()
        for t in threads:
            t.join()
        time.sleep(0.3)
        a = metrics(r1)["vllm:lora_requests_info"].samples[0]
        time.sleep(1.1)
        b = metrics(r1)["vllm:lora_requests_info"].samples[0]
        assert a.labels["running_lora_adapters"] == "" and a.labels["waiting_lora_adapters"] == ""
        assert a.value == b.value, "the value is the time of the last change, not of the scrape"
        assert seen_running == set(names), seen_running
        self.note(f"- metrics conformance (prometheus_client parser, {scrapes} scrapes under 8 concurrent mixed-adapter streams): GIE names and types, kv_cache_usage_perc in [0,1], lora_requests_info labels; running adapters seen {sorted(seen_running)}, waiting {sorted(seen_waiting)}; its value stays put while the lists do")

    # -- 8. a replica dies behind HAProxy ------------------------------------------------
    def replica_dies(self):
        names = [f"z{k:02d}" for k in range(20)]
        stop = threading.Event()
        results = []

        def client(i):
            k = i
            while not stop.is_set():
                try:
                    s, _ = complete(self.a.proxy, names[k % 20], max_tokens=4, timeout=20)
                except Exception as e:  # connection reset mid-request
                    s = repr(e)
                results.append((time.time(), s))
                k += 3

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        killed_at = time.time()
        os.kill(self.pid("r2"), signal.SIGKILL)
        time.sleep(5)
        stop.set()
        for t in threads:
            t.join()
        failed = [s for _, s in results if s != 200]
        after = [s for t, s in results if t > killed_at + 3]
        assert len(failed) <= 4, failed
        assert after and all(s == 200 for s in after), after[:5]
        for n in names:
            assert complete(self.a.proxy, n, max_tokens=2)[0] == 200, n
        self.note(f"- kill -9 of r2 under 4 concurrent clients through HAProxy: {len(results)} requests, {len(failed)} failed (in flight at the kill, at most 4 allowed), all 20 adapters still answered by r1/r3")

    def secrets_never_logged(self):
        for name in ("r1", "r2", "r3", "p1", "p2"):
            with open(f"{self.a.work}/{name}.log") as f:
                assert self.a.secret not in f.read(), f"the secret key is in {name}'s log"
        self.note("- the secret access key appears in no replica's log or error body")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work"); p.add_argument("--report"); p.add_argument("--proxy"); p.add_argument("--proxy-rr")
    p.add_argument("--replica", action="append"); p.add_argument("--s3"); p.add_argument("--secret")
    a = p.parse_args()
    run = Run(a)
    t0 = time.time()
    old = run.upload_then_serve_elsewhere()
    run.replace_is_seen(old)
    run.concurrent_replaces()
    run.kill_mid_upload()
    run.store_outage()
    run.affinity()
    run.metrics_conformance()
    run.replica_dies()
    run.secrets_never_logged()
    run.note(f"\nall replica checks passed in {time.time() - t0:.0f} s")
    os.makedirs(os.path.dirname(a.report) or ".", exist_ok=True)
    with open(a.report, "w") as f:
        f.write("# Replicas on one S3 store (tests/replicas/run.sh)\n\n" + "\n".join(run.report) + "\n")


if __name__ == "__main__":
    main()
