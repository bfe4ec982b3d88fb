"""Bounded load test on loopback: many concurrent streaming clients, memory and determinism checks.

    python scripts/load_test.py --model default --clients 64 --duration 180
    python scripts/load_test.py --url http://127.0.0.1:8000 --pid 1234      # a server already running

Every client loops: POST /sample with "stream": true, read the SSE stream to its end. An accepted
stream must end with `done`; a 503 (queue full) counts as rejected, not failed. Meanwhile a fixed
seeded request is sent again and again; it must return the text it returned alone before the load.
The server's resident memory is sampled every second; after the warm-up (the first 25 % of the run)
it must stay flat. Prints the figures and exits 1 if a guarantee fails. Only loopback addresses.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

REPO_ROOT = Path(__file__).resolve().parents[1]
SEEDED = {"num_samples": 1, "steps": 16, "seed": 1234}
RSS_GROWTH_LIMIT = 0.15  # relative growth allowed between the end of the warm-up and the end of the run


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start_server(model: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ = {**os.environ, "SEDD_MODEL": model, "SEDD_DEVICE": os.environ.get("SEDD_DEVICE", "cpu"),
               "SEDD_LOG_LEVEL": "warning", **env}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"], cwd=REPO_ROOT, env=environ)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready within 120 s")


async def stream_once(client: httpx.AsyncClient, body: dict) -> tuple[str, float]:
    """('done' | 'error' | 'rejected' | 'incomplete', seconds)."""
    start = time.perf_counter()
    async with aconnect_sse(client, "POST", "/sample", json=body) as source:
        if source.response.status_code == 503:
            return "rejected", time.perf_counter() - start
        if source.response.status_code != 200:
            return "error", time.perf_counter() - start
        async for event in source.aiter_sse():
            if event.event in ("done", "error"):
                return event.event, time.perf_counter() - start
    return "incomplete", time.perf_counter() - start


async def run_load(url: str, clients: int, duration: float, steps: int, pid: int | None) -> dict:
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0), limits=limits) as client:
        alone = (await client.post("/sample", json=SEEDED)).json()["samples"][0]["text"]
        outcomes: dict[str, int] = {}
        latencies: list[float] = []
        seeded_results: list[bool] = []
        rss: list[tuple[float, int]] = []
        start = time.monotonic()
        stop_at = start + duration
        body = {"num_samples": 1, "steps": steps, "stream": True, "stream_every": max(1, steps // 8)}

        async def client_loop():
            while time.monotonic() < stop_at:
                outcome, seconds = await stream_once(client, body)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "done":
                    latencies.append(seconds)
                elif outcome == "rejected":
                    await asyncio.sleep(0.5)

        async def seeded_loop():
            while time.monotonic() < stop_at:
                response = await client.post("/sample", json=SEEDED)
                if response.status_code == 200:
                    seeded_results.append(response.json()["samples"][0]["text"] == alone)
                await asyncio.sleep(1.0)

        async def memory_loop():
            while pid and time.monotonic() < stop_at:
                rss.append((time.monotonic() - start, rss_bytes(pid)))
                await asyncio.sleep(1.0)

        await asyncio.gather(*(client_loop() for _ in range(clients)), seeded_loop(), memory_loop())
        elapsed = time.monotonic() - start
    after_warmup = [value for t, value in rss if t >= 0.25 * duration]
    growth = (after_warmup[-1] - after_warmup[0]) / after_warmup[0] if len(after_warmup) > 1 else 0.0
    accepted = sum(outcomes.get(k, 0) for k in ("done", "error", "incomplete"))
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [float("nan")] * 19
    return {
        "clients": clients, "duration_s": round(elapsed, 1), "steps": steps, "requests": sum(outcomes.values()),
        "accepted": accepted, "done": outcomes.get("done", 0), "errors": outcomes.get("error", 0),
        "incomplete": outcomes.get("incomplete", 0), "rejected_503": outcomes.get("rejected", 0),
        "samples_per_s": round(outcomes.get("done", 0) / elapsed, 2),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None, "p95_s": round(quantiles[18], 3),
        "seeded_checks": len(seeded_results), "seeded_mismatches": seeded_results.count(False),
        "rss_mb_after_warmup": round(after_warmup[0] / 2**20, 1) if after_warmup else None,
        "rss_mb_end": round(after_warmup[-1] / 2**20, 1) if after_warmup else None,
        "rss_mb_max": round(max(after_warmup) / 2**20, 1) if after_warmup else None,
        "rss_growth": round(growth, 4),
    }


def failures(result: dict) -> list[str]:
    problems = []
    if result["done"] != result["accepted"]:
        problems.append(f"{result['accepted'] - result['done']} accepted streams did not end with done")
    if result["seeded_checks"] == 0 or result["seeded_mismatches"]:
        problems.append(f"seeded request: {result['seeded_mismatches']} of {result['seeded_checks']} differed")
    if result["rss_growth"] > RSS_GROWTH_LIMIT:
        problems.append(f"memory grew {result['rss_growth']:.1%} after the warm-up")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model for the server this script starts")
    parser.add_argument("--url", help="a running server instead (loopback only)")
    parser.add_argument("--pid", type=int, help="its process id, for the memory figures")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--max-rows", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    proc = None
    if args.url:
        if httpx.URL(args.url).host not in ("127.0.0.1", "localhost", "::1"):
            parser.error("the load test only targets loopback addresses")
        url, pid = args.url, args.pid
    else:
        proc, url = start_server(args.model, {"SEDD_MAX_ROWS": str(args.max_rows),
                                              "SEDD_MAX_QUEUE": str(args.clients)})
        pid = proc.pid
    try:
        result = asyncio.run(run_load(url, args.clients, args.duration, args.steps, pid))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    problems = failures(result)
    if args.json:
        print(json.dumps({**result, "failures": problems}))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")
        print("OK" if not problems else "FAILED: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
