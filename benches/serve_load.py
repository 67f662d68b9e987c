"""Bounded load test of `tcd-ort serve` on loopback.

Starts the server (`tcd-ort serve --model DIR --listen 127.0.0.1:0 ...`, as tests/server does),
then N client threads (default 4) send a fixed number of requests (default 40) between them,
cycling through four routes: A1111 txt2img, A1111 img2img with a mask, OpenAI generations and
OpenAI edits with a mask. It records every answer's status (only 200 and 429 are allowed: anything
else, or a request that got no answer, is a failure), the latency per route (median, p95), and the
server's RSS (VmRSS from /proc/PID/status) every --rss-interval seconds. RSS is called flat when,
after the first --warmup requests have finished, the median of the last quarter of the samples is
within --rss-tolerance-mib (or --rss-tolerance-pct of the first quarter's median, whichever is
larger) of the first quarter's median. Stops the server with SIGTERM and checks it exits 0.

Exit status: 0 when every answer was 200 or 429 and the server exited 0; 1 otherwise (RSS growth is
reported, and fails the run only with --fail-on-rss-growth).

    .venv/bin/python benches/serve_load.py                     # target/debug/tcd-ort, tiny SD1.5
    .venv/bin/python benches/serve_load.py --bin target/release/tcd-ort --clients 8 \\
        --requests 200 --json serve-load.json

Standard library plus requests and Pillow (both in the pinned environment).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from serverlib import MODEL, Server, b64_png, native_size, png_bytes  # noqa: E402

ROUTES = ["a1111-txt2img", "a1111-img2img", "openai-generations", "openai-edits"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", help="tcd-ort binary (default: $TCD_ORT_BIN or target/debug/tcd-ort)")
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=40, help="total, over all clients")
    p.add_argument("--size", type=int, help="image side (default: the model's native size)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--queue", type=int, help="--queue for the server (default: its own)")
    p.add_argument("--workers", type=int, help="--workers for the server (default: its own)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="one more argument for `tcd-ort serve` (repeatable)")
    p.add_argument("--rss-interval", type=float, default=0.2, help="seconds between RSS samples")
    p.add_argument("--warmup", type=int, default=5,
                   help="requests finished before RSS samples count")
    p.add_argument("--rss-tolerance-mib", type=float, default=32.0)
    p.add_argument("--rss-tolerance-pct", type=float, default=5.0)
    p.add_argument("--fail-on-rss-growth", action="store_true")
    p.add_argument("--json", help="write the figures here too")
    return p.parse_args()


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


class Load:
    def __init__(self, args, server: Server, size: int):
        self.args, self.server, self.size = args, server, size
        self.lock = threading.Lock()
        self.counter = itertools.count()
        self.results = []  # (route, status or None, seconds, end time, error text)
        self.done = 0
        self.rss = []  # (time, done, KiB)
        self.stop = threading.Event()
        init = Image.new("RGB", (size, size), (120, 80, 200))
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        alpha_mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
        alpha_mask.paste((0, 0, 0, 0), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        self.init_b64, self.mask_b64 = b64_png(init), b64_png(mask)
        self.init_png, self.alpha_mask_png = png_bytes(init), png_bytes(alpha_mask)

    def request(self, session: requests.Session, i: int):
        a, s, url = self.args, self.size, self.server.url
        route = ROUTES[i % len(ROUTES)]
        common = {"prompt": f"load test {i}", "steps": a.steps, "seed": i}
        if route == "a1111-txt2img":
            return route, session.post(url + "/sdapi/v1/txt2img", timeout=600, json={
                **common, "width": s, "height": s, "batch_size": a.batch})
        if route == "a1111-img2img":
            return route, session.post(url + "/sdapi/v1/img2img", timeout=600, json={
                **common, "width": s, "height": s, "batch_size": a.batch,
                "init_images": [self.init_b64], "mask": self.mask_b64,
                "denoising_strength": 0.75})
        if route == "openai-generations":
            return route, session.post(url + "/v1/images/generations", timeout=600, json={
                **common, "size": f"{s}x{s}", "n": a.batch, "response_format": "b64_json"})
        return route, session.post(url + "/v1/images/edits", timeout=600, files={
            "image": ("image.png", self.init_png, "image/png"),
            "mask": ("mask.png", self.alpha_mask_png, "image/png"),
            "prompt": (None, common["prompt"]), "steps": (None, str(a.steps)),
            "seed": (None, str(i)), "size": (None, f"{s}x{s}"), "n": (None, str(a.batch)),
        })

    def client(self):
        with requests.Session() as session:
            while True:
                i = next(self.counter)
                if i >= self.args.requests:
                    return
                t0 = time.monotonic()
                route, status, err = ROUTES[i % len(ROUTES)], None, ""
                try:
                    route, r = self.request(session, i)
                    status = r.status_code
                    if status not in (200, 429):
                        err = r.text[:300]
                    elif status == 200:
                        body = r.json()
                        got = len(body.get("images") or body.get("data") or [])
                        if got != self.args.batch:
                            err = f"200 with {got} images, asked for {self.args.batch}"
                    elif "Retry-After" not in r.headers:
                        err = "429 without Retry-After"
                except (requests.RequestException, ValueError) as e:
                    err = f"{type(e).__name__}: {e}"
                t1 = time.monotonic()
                with self.lock:
                    self.results.append((route, status, t1 - t0, t1, err))
                    self.done += 1

    def sample_rss(self):
        while not self.stop.is_set():
            kib = self.server.rss_kib()
            if kib is not None:
                with self.lock:
                    self.rss.append((time.monotonic(), self.done, kib))
            self.stop.wait(self.args.rss_interval)

    def run(self):
        sampler = threading.Thread(target=self.sample_rss, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        clients = [threading.Thread(target=self.client) for _ in range(self.args.clients)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        self.wall = time.monotonic() - t0
        self.stop.set()
        sampler.join()


def rss_verdict(load: Load, args):
    after = [kib for _, done, kib in load.rss if done >= args.warmup]
    out = {"samples": len(load.rss), "samples_after_warmup": len(after),
           "start_mib": load.rss[0][2] / 1024 if load.rss else None,
           "peak_mib": max(k for _, _, k in load.rss) / 1024 if load.rss else None}
    if len(after) < 8:
        out.update(flat=None, reason="too few samples after warm-up (more requests?)")
        return out
    q = len(after) // 4
    first, last = statistics.median(after[:q]) / 1024, statistics.median(after[-q:]) / 1024
    tolerance = max(args.rss_tolerance_mib, first * args.rss_tolerance_pct / 100)
    out.update(first_quarter_median_mib=first, last_quarter_median_mib=last,
               growth_mib=last - first, tolerance_mib=tolerance, flat=last - first <= tolerance)
    return out


def main():
    args = parse_args()
    if args.bin:
        os.environ["TCD_ORT_BIN"] = args.bin
    model = Path(args.model)
    size = args.size or native_size(model)
    server_args = list(args.server_arg)
    if args.queue is not None:
        server_args += ["--queue", str(args.queue)]
    if args.workers is not None:
        server_args += ["--workers", str(args.workers)]
    server = Server(server_args, model=model)
    print(f"server {server.url} pid {server.pid}: {' '.join(server.args)}", file=sys.stderr)
    load = Load(args, server, size)
    try:
        load.run()
    finally:
        rc = server.stop()

    rows, failures = [], []
    for route in ROUTES + ["all"]:
        rs = [r for r in load.results if route in ("all", r[0])]
        if not rs:
            continue
        ok = [r[2] for r in rs if r[1] == 200 and not r[4]]
        counts = {}
        for r in rs:
            counts[str(r[1])] = counts.get(str(r[1]), 0) + 1
        rows.append({
            "route": route, "requests": len(rs), "status": counts,
            "median_s": statistics.median(ok) if ok else None,
            "p95_s": percentile(ok, 95) if ok else None,
        })
    for route, status, _, _, err in load.results:
        if status not in (200, 429) or err:
            failures.append(f"{route}: {status}: {err}")
    if len(load.results) != args.requests:
        failures.append(f"{args.requests} requests sent, {len(load.results)} answered")
    if rc != 0:
        failures.append(f"server exited {rc} after SIGTERM:\n{server.stderr()}")
    rss = rss_verdict(load, args)

    print(f"\n{args.requests} requests, {args.clients} clients, {size}x{size}, {args.steps} steps, "
          f"batch {args.batch}, {load.wall:.1f} s wall, {args.requests / load.wall:.2f} req/s\n")
    print(f"{'route':<20} {'n':>4} {'200':>4} {'429':>4} {'other':>5} {'median s':>9} "
          f"{'p95 s':>7}")
    for r in rows:
        other = r["requests"] - r["status"].get("200", 0) - r["status"].get("429", 0)
        med = f"{r['median_s']:.3f}" if r["median_s"] is not None else "-"
        p95 = f"{r['p95_s']:.3f}" if r["p95_s"] is not None else "-"
        print(f"{r['route']:<20} {r['requests']:>4} {r['status'].get('200', 0):>4} "
              f"{r['status'].get('429', 0):>4} {other:>5} {med:>9} {p95:>7}")
    print(f"\nRSS: {rss['samples']} samples every {args.rss_interval}s, start "
          f"{rss['start_mib'] or 0:.0f} MiB, peak {rss['peak_mib'] or 0:.0f} MiB")
    if rss["flat"] is None:
        print(f"RSS flat: unknown ({rss['reason']})")
    else:
        print(f"RSS after {args.warmup} requests: first quarter median "
              f"{rss['first_quarter_median_mib']:.1f} MiB, last quarter "
              f"{rss['last_quarter_median_mib']:.1f} MiB, growth {rss['growth_mib']:+.1f} MiB "
              f"(tolerance {rss['tolerance_mib']:.1f}): {'FLAT' if rss['flat'] else 'GROWING'}")
    print(f"server exit code after SIGTERM: {rc}")
    for f in failures:
        print(f"FAILURE {f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "size": size, "wall_s": load.wall, "routes": rows, "rss": rss,
            "rss_samples": load.rss, "exit_code": rc, "failures": failures}, indent=1))
    bad = bool(failures) or (args.fail_on_rss_growth and rss["flat"] is False)
    print("\nRESULT:", "FAIL" if bad else "PASS")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
