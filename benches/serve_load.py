#!/usr/bin/env python3
"""Load test for an OpenAI-compatible server on loopback (quarry serve, llama-server): one streaming client
alone, then CLIENTS streaming clients at once, ROUNDS requests each, then DROP clients that vanish mid-stream
followed by one short request. Prints time to first token p50/p99, aggregate and single tok/s. Standard library
only; it stops by itself (every request is bounded by max_tokens and a timeout).

  python3 benches/serve_load.py http://127.0.0.1:8080 [--clients 16] [--rounds 2] [--tokens 64]
"""
import argparse
import http.client
import json
import socket
import statistics
import threading
import time
import urllib.parse

p = argparse.ArgumentParser()
p.add_argument("url")
p.add_argument("--clients", type=int, default=16)
p.add_argument("--rounds", type=int, default=2)
p.add_argument("--tokens", type=int, default=64)
p.add_argument("--drop", type=int, default=8)
p.add_argument("--completions", action="store_true",
               help="use /v1/completions with a raw prompt (llama-server's Granite chat parser fails mid-stream "
                    "on random-weight output: 'does not match the expected peg-native format')")
a = p.parse_args()
u = urllib.parse.urlparse(a.url)


PATH = "/v1/completions" if a.completions else "/v1/chat/completions"


def body(i, n):
    text = "Tell me story number %d." % i
    prompt = {"prompt": text} if a.completions else {"messages": [{"role": "user", "content": text}]}
    return json.dumps({"model": "x", **prompt, "max_tokens": n, "temperature": 0.7, "seed": i, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()


def stream(i, n):
    """(ok, tokens generated (the usage chunk's count), seconds to the first content delta, seconds in
    all)."""
    t0 = time.time()
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    c.request("POST", PATH, body=body(i, n), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    first, toks, done = None, 0, False
    for line in r:
        if line.startswith(b"data: [DONE]"):
            done = True
            break
        if line.startswith(b"data: {"):
            d = json.loads(line[6:])
            if d.get("usage"):
                toks = d["usage"]["completion_tokens"]
            elif d.get("error"):
                break
            elif d.get("choices") and (d["choices"][0].get("text") or
                                       d["choices"][0].get("delta", {}).get("content") is not None):
                first = first or time.time() - t0
    c.close()
    return r.status == 200 and done, toks, first or 0.0, time.time() - t0


stream(0, 4)  # warm: the first request after start-up pays for page faults and first-use set-up
ok, toks, ttft, wall = stream(0, a.tokens)
single = toks / wall
print("single client: %d tokens in %.2f s = %.1f tok/s, first token %.0f ms" % (toks, wall, single, ttft * 1e3))

results = []
lock = threading.Lock()


def client(k):
    for r in range(a.rounds):
        out = stream(1000 + k * 10 + r, a.tokens)
        with lock:
            results.append(out)


t0 = time.time()
ts = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
[t.start() for t in ts]
[t.join() for t in ts]
wall = time.time() - t0
firsts = sorted(r[2] for r in results)
agg = sum(r[1] for r in results) / wall
q = statistics.quantiles(firsts, n=100, method="inclusive")
print("%d clients x %d: %d/%d complete, %d tokens in %.1f s = %.1f tok/s aggregate (%.2fx single); "
      "first token p50 %.0f ms p99 %.0f ms" % (a.clients, a.rounds, sum(r[0] for r in results), len(results),
                                             sum(r[1] for r in results), wall, agg, agg / single,
                                             q[49] * 1e3, q[98] * 1e3))

socks = []
for i in range(a.drop):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    c.request("POST", PATH, body=body(5000 + i, 4000), headers={"Content-Type": "application/json"})
    c.getresponse().fp.readline()
    socks.append(c)
for c in socks:
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
time.sleep(1)
ok, toks, ttft, wall = stream(9999, 8)
print("after %d clients vanished mid-stream: an 8-token reply %s in %.2f s" % (a.drop, "ok" if ok else "FAILED", wall))
