"""Operations: /healthz, /metrics, /openapi.json, a full queue, SIGTERM while busy."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

# Every route the tests use (method, OpenAPI path).
ROUTES = [
    ("post", "/sdapi/v1/txt2img"),
    ("post", "/sdapi/v1/img2img"),
    ("get", "/sdapi/v1/progress"),
    ("get", "/sdapi/v1/options"),
    ("get", "/sdapi/v1/sd-models"),
    ("get", "/sdapi/v1/samplers"),
    ("get", "/sdapi/v1/loras"),
    ("post", "/sdapi/v1/interrupt"),
    ("post", "/v1/images/generations"),
    ("post", "/v1/images/edits"),
    ("get", "/healthz"),
    ("get", "/metrics"),
]


def test_healthz(server, http):
    r = http.get(server.url + "/healthz", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_metrics(server, http, size):
    http.post(server.url + "/sdapi/v1/txt2img", timeout=60,
              json={"prompt": "x", "steps": 1, "width": size, "height": size}).raise_for_status()
    r = http.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain"), r.headers
    text = r.text
    for name in ["tcd_requests_total", "tcd_queue_depth", "tcd_generation_seconds_count",
                 "tcd_generation_seconds_sum", "tcd_generation_seconds_bucket"]:
        assert name in text, f"{name} missing from /metrics:\n{text[:2000]}"
    lines = [ln for ln in text.splitlines() if ln.startswith("tcd_requests_total{")]
    assert any('status="200"' in ln and "txt2img" in ln for ln in lines), lines
    depth = [ln for ln in text.splitlines() if ln.startswith("tcd_queue_depth")]
    assert depth and float(depth[0].split()[-1]) >= 0


def test_openapi_lists_routes(server, http):
    r = http.get(server.url + "/openapi.json", timeout=10)
    assert r.status_code == 200
    doc = r.json()
    assert str(doc.get("openapi", "")).startswith("3.1"), doc.get("openapi")
    paths = doc["paths"]
    missing = [f"{m.upper()} {p}" for m, p in ROUTES if m not in paths.get(p, {})]
    assert not missing, f"not in /openapi.json: {missing}"


def test_queue_full(queue_server, size):
    """--queue 1 --workers 1 and 6 slow requests at once: each is 200 or 429 (with
    Retry-After), at least one of each, none lost."""
    url = queue_server.url
    n = 6

    def one(i):
        if i % 2:
            return requests.post(url + "/v1/images/generations", timeout=300, json={
                "prompt": f"q{i}", "size": "128x128", "n": 2, "steps": 8, "seed": i})
        return requests.post(url + "/sdapi/v1/txt2img", timeout=300, json={
            "prompt": f"q{i}", "width": 128, "height": 128, "batch_size": 2, "steps": 8,
            "seed": i})

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(one, range(n)))
    statuses = [r.status_code for r in responses]
    assert len(statuses) == n
    assert set(statuses) <= {200, 429}, [(r.status_code, r.text[:200]) for r in responses]
    assert 200 in statuses and 429 in statuses, statuses
    for r in responses:
        if r.status_code == 429:
            ra = r.headers.get("Retry-After")
            assert ra is not None and ra.isdigit() and int(ra) >= 1, r.headers
            r.json()
        else:
            assert len(r.json().get("images") or r.json().get("data")) == 2
    # The queue drains: a request afterwards goes through.
    r = requests.post(url + "/sdapi/v1/txt2img", timeout=60,
                      json={"prompt": "x", "steps": 1, "width": size, "height": size})
    assert r.status_code == 200


def test_sigterm_while_busy(fresh_server):
    """SIGTERM while a request runs: that request still gets an answer (200, or a deliberate
    503), new requests are refused or the port closes, and the process exits 0."""
    s = fresh_server
    out: dict = {}

    def run():
        try:
            out["r"] = requests.post(s.url + "/sdapi/v1/txt2img", timeout=300, json={
                "prompt": "x", "width": 128, "height": 128, "steps": 16, "seed": 1})
        except requests.RequestException as e:
            out["exc"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and t.is_alive():
        st = requests.get(s.url + "/sdapi/v1/progress", timeout=10).json()["state"]
        if st.get("sampling_steps") == 16 and 1 <= st.get("sampling_step", 0) < 16:
            break
        time.sleep(0.05)
    assert t.is_alive(), "request finished before SIGTERM could be sent (make it slower)"
    s.terminate()
    t.join(120)
    assert not t.is_alive()
    assert "exc" not in out, f"request lost on SIGTERM: {out.get('exc')!r}\n{s.stderr()}"
    r = out["r"]
    assert r.status_code in (200, 503), (r.status_code, r.text[:300])
    if r.status_code == 200:
        assert len(r.json()["images"]) == 1
    rc = s.proc.wait(60)
    assert rc == 0, f"exit {rc}\n{s.stderr()}"


def test_timeout_answers_504_and_frees_the_worker(_binary_ok, http, size):
    from serverlib import Server

    s = Server(["--timeout", "1", "--shutdown-grace", "5"])
    try:
        r = http.post(s.url + "/sdapi/v1/txt2img", timeout=120,
                      json={"prompt": "slow", "steps": 40, "width": 256, "height": 256,
                            "batch_size": 4})
        assert r.status_code == 504, r.text
        assert "--timeout" in r.json()["detail"]
        # The worker stopped between steps: the next request is served.
        r = http.post(s.url + "/sdapi/v1/txt2img", timeout=60,
                      json={"prompt": "fast", "steps": 1, "width": size, "height": size})
        assert r.status_code == 200, r.text
        metrics = http.get(s.url + "/metrics", timeout=10).text
        assert 'tcd_jobs_total{outcome="stopped"} 1' in metrics, metrics
    finally:
        assert s.stop() == 0, s.stderr()


def test_sigterm_right_after_ready_is_graceful(_binary_ok):
    """The signal handlers are in place before the `listening on` line: a supervisor that stops
    the server at once gets exit status 0, never the default kill (-15)."""
    from serverlib import Server

    for _ in range(5):
        s = Server(["--shutdown-grace", "5"])
        rc = s.stop()
        assert rc == 0, f"exit {rc}\n{s.stderr()}"
