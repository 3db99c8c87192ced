"""Load: `hybrid-k2 serve demo` in its own process, 200 requests from 8 concurrent `openai` clients.

Every request is answered or refused with 429 (none lost), each answer is the one its own prompt gives
(none mixed up), and the server's RSS and thread count stay flat from the first 50 answers to the last 50."""
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest

import hybrid_k2

N_REQ, N_CLIENTS, MAX_NEW = 200, 8, 6


def proc_status(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["Threads"])


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "hybrid_k2", "serve", "demo", "--port", str(port), "--ctx", "1024",
                          "--max-queue", "4", "--served-model-name", "demo"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert p.poll() is None, p.stderr.read().decode()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.1)
    yield url, p
    p.terminate()
    assert p.wait(20) == 143     # SIGTERM: a clean shutdown, not a crash
    p.stderr.close()


def test_200_requests_8_clients(server):
    url, proc = server
    engine = hybrid_k2.load("demo", ctx=1024)
    # distinct first tokens: no prompt is a prefix of another, so each answer has one right value
    prompts = [[17 + i, 300 + (i * 7) % 500, 40 + i % 13] for i in range(N_REQ)]
    expected = [engine.generate(p, max_new_tokens=MAX_NEW, temperature=0).token_ids for p in prompts]
    engine.close()
    expected_text = [engine.tokenizer.decode(t) for t in expected]
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    done = []
    samples = {}
    lock = threading.Lock()

    refused = []

    def one(i):
        while True:   # as a client does: back off on 429 and try again
            try:
                r = client.completions.create(model="demo", prompt=prompts[i], max_tokens=MAX_NEW, temperature=0)
                break
            except openai.RateLimitError as e:
                assert e.status_code == 429 and e.code == "queue_full"
                refused.append(i)
                time.sleep(0.05)
        out = ("ok", r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens)
        with lock:
            done.append((i, out))
            if len(done) in (50, N_REQ - 50):
                samples[len(done)] = proc_status(proc.pid)
        return out

    with ThreadPoolExecutor(N_CLIENTS) as pool:
        results = list(pool.map(one, range(N_REQ)))
    assert len(results) == N_REQ and sorted(i for i, _ in done) == list(range(N_REQ))
    for i, r in enumerate(results):
        assert r[1] == expected_text[i] and r[2] == len(prompts[i]) and r[3] == len(expected[i]), i
    assert refused, "8 clients against 1 running + 4 waiting: some requests must have been refused"
    (rss0, thr0), (rss1, thr1) = samples[50], samples[N_REQ - 50]
    assert thr1 <= thr0 + 2, (thr0, thr1)
    assert rss1 <= rss0 * 1.1 + 20 * 2**20, (rss0, rss1)
    assert httpx.get(url + "/health").status_code == 200
