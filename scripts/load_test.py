"""Bounded load test on loopback: many concurrent streaming clients, memory and determinism checks.

    python scripts/load_test.py --model default --clients 64 --duration 180      # what `make load` runs
    python scripts/load_test.py --url http://127.0.0.1:8000 --pid 1234            # a server already running

Every client loops: POST /sample with "stream": true, read the SSE stream to its end, start again, until
--duration has passed; the run then waits (at most --grace seconds) for the streams already started.
Guarantees, each a reason to exit 1:

* every accepted stream ends with `done` (an `error` event, a stream cut short, a transport error or an
  HTTP status other than 200 and 503 is a failure; a 503 (queue full) is counted, not failed);
* a fixed seeded request, sent again and again during the load (as JSON and as a stream), returns the
  text it returned alone before the load, every time;
* the server's resident memory (psutil when installed, else /proc/PID/status), sampled every second,
  is flat after the warm-up (the first quarter of the run): the last sample is at most 15 % above the
  first one after the warm-up.

Prints the figures (requests, errors, 503s, latency p50/p95, samples/s, memory) and, with --json, one
JSON object. Only loopback addresses are targeted.

It also reports how the server's event loop keeps up (`--threads` and `--heartbeat` set the started server's
SEDD_TORCH_THREADS and SEDD_STREAM_HEARTBEAT_S, to compare thread counts under the same load):

* time to the response headers and to the first event of every stream;
* heartbeat regularity: the gaps between consecutive `: ping` comments of a stream, both as the server stamped
  them (sse-starlette writes its clock into each ping when its timer fires, so a gap above the heartbeat is
  the server's event loop running late) and as they arrived here;
* each stream's longest silence (no event, no ping);
* this client's own event-loop lag (a 50 ms timer's lateness), to tell a late server from a late client.

    python scripts/load_test.py --clients 64 --duration 45 --steps 32 --stream-every 1 --heartbeat 1 --threads 2
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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
SEEDED = {"num_samples": 1, "steps": 16, "seed": 1234}
RSS_GROWTH_LIMIT = 0.15  # growth allowed from the first sample after the warm-up to the last
WARMUP_FRACTION = 0.25
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def rss_bytes(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
    return psutil.Process(pid).memory_info().rss


def start_server(model: str, env: dict[str, str], timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """uvicorn on a free loopback port, CPU unless SEDD_DEVICE says otherwise; returns when /health is 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ = {**os.environ, "SEDD_MODEL": model, "SEDD_DEVICE": os.environ.get("SEDD_DEVICE", "cpu"),
               "SEDD_LOG_LEVEL": "warning", **env}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"], cwd=REPO_ROOT, env=environ)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"the server did not become ready within {timeout:g} s")


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Timeline:
    """When one stream's parts arrived (seconds after its request was sent), and the server's ping stamps."""

    headers_s: float | None = None
    first_event_s: float | None = None
    arrivals: list[float] = field(default_factory=list)  # every event and ping
    ping_arrivals: list[float] = field(default_factory=list)
    ping_stamps: list[float] = field(default_factory=list)  # server clock (POSIX seconds) in each ping


async def stream_once(client: httpx.AsyncClient, body: dict,
                      timeline: Timeline | None = None) -> tuple[str, float, dict | None]:
    """('done' | 'error' | 'rejected' | 'incomplete' | 'http <status>' | 'transport', seconds, done data).

    Reads the raw lines (an SSE client library drops the `: ping` comments) and notes their times in
    `timeline`."""
    timeline = timeline if timeline is not None else Timeline()
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/sample", json={**body, "stream": True}) as response:
            timeline.headers_s = time.perf_counter() - start
            if response.status_code != 200:
                await response.aread()
                status = response.status_code
                return ("rejected" if status == 503 else f"http {status}"), time.perf_counter() - start, None
            event = None
            async for line in response.aiter_lines():
                now = time.perf_counter() - start
                if line.startswith(":"):
                    timeline.arrivals.append(now)
                    if "ping - " in line:
                        timeline.ping_arrivals.append(now)
                        timeline.ping_stamps.append(datetime.fromisoformat(line.split("ping - ", 1)[1]).timestamp())
                elif line.startswith("event:"):
                    event = line[6:].strip()
                    timeline.arrivals.append(now)
                    if timeline.first_event_s is None:
                        timeline.first_event_s = now
                elif line.startswith("data:") and event in ("done", "error"):
                    if event == "error":
                        return "error", now, None
                    return "done", now, json.loads(line[5:])
    except httpx.TransportError:
        return "transport", time.perf_counter() - start, None
    return "incomplete", time.perf_counter() - start, None


async def loop_lag(stop_at: float, lags: list[float], period: float = 0.05) -> None:
    """This process's own event-loop lateness: how late a `period` timer fires, again and again."""
    while time.monotonic() < stop_at:
        start = time.perf_counter()
        await asyncio.sleep(period)
        lags.append(time.perf_counter() - start - period)


async def run_load(url: str, clients: int, duration: float, steps: int, pid: int | None,
                   grace: float = 300.0, stream_every: int | None = None) -> dict:
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(grace), limits=limits) as client:
        first = await client.post("/sample", json=SEEDED)
        first.raise_for_status()
        alone = first.json()["samples"][0]["text"]
        outcomes: dict[str, int] = {}
        latencies: list[float] = []
        timelines: list[Timeline] = []
        client_lags: list[float] = []
        seeded: list[bool] = []
        rss: list[tuple[float, int]] = []
        start = time.monotonic()
        stop_at = start + duration
        body = {"num_samples": 1, "steps": steps, "stream_every": stream_every or max(1, steps // 8)}

        async def client_loop():
            while time.monotonic() < stop_at:
                timeline = Timeline()
                outcome, seconds, _ = await stream_once(client, body, timeline)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "done":
                    latencies.append(seconds)
                    timelines.append(timeline)
                elif outcome == "rejected":
                    await asyncio.sleep(0.5)

        async def seeded_loop(streamed: bool):
            """The seeded request again and again, as JSON or as a stream; its answers are not in the figures."""
            while time.monotonic() < stop_at:
                if streamed:
                    outcome, _, done = await stream_once(client, SEEDED)
                    text = done["samples"][0]["text"] if outcome == "done" else None
                else:
                    try:
                        response = await client.post("/sample", json=SEEDED)
                    except httpx.TransportError:
                        outcome, text = "transport", None
                    else:
                        outcome = {200: "done", 503: "rejected"}.get(response.status_code,
                                                                    f"http {response.status_code}")
                        text = response.json()["samples"][0]["text"] if outcome == "done" else None
                if text is not None:
                    seeded.append(text == alone)
                elif outcome != "rejected":
                    outcomes[f"seeded {outcome}"] = outcomes.get(f"seeded {outcome}", 0) + 1
                await asyncio.sleep(1.0)

        async def memory_loop():
            while pid and time.monotonic() < stop_at:
                rss.append((time.monotonic() - start, rss_bytes(pid)))
                await asyncio.sleep(1.0)

        tasks = [asyncio.ensure_future(coro) for coro in
                 [*(client_loop() for _ in range(clients)), seeded_loop(False), seeded_loop(True), memory_loop(),
                  loop_lag(stop_at, client_lags)]]
        _, late = await asyncio.wait(tasks, timeout=duration + grace)
        for task in late:  # a stream still running `grace` seconds after the end: a failure, not a hang
            task.cancel()
        outcomes["unfinished"] = len(late)
        elapsed = time.monotonic() - start
    result = summarize(clients, duration, steps, elapsed, outcomes, latencies, seeded, rss)
    result["stream_every"] = body["stream_every"]
    result["event_loop"] = event_loop_figures(timelines, client_lags)
    return result


def event_loop_figures(timelines: list[Timeline], client_lags: list[float]) -> dict:
    """Quantiles (seconds) of what the finished streams show of the server's event loop; see the module doc."""
    stamped = [b - a for t in timelines for a, b in zip(t.ping_stamps, t.ping_stamps[1:])]
    arrived = [b - a for t in timelines for a, b in zip(t.ping_arrivals, t.ping_arrivals[1:])]
    silences = [max(b - a for a, b in zip([0.0, *t.arrivals], t.arrivals)) for t in timelines if t.arrivals]
    return {
        "streams": len(timelines),
        "headers_s": spread([t.headers_s for t in timelines if t.headers_s is not None]),
        "first_event_s": spread([t.first_event_s for t in timelines if t.first_event_s is not None]),
        "ping_gap_server_s": spread(stamped),
        "ping_gap_client_s": spread(arrived),
        "longest_silence_s": spread(silences),
        "client_loop_lag_s": spread(client_lags),
    }


def spread(values: list[float]) -> dict:
    """n, min, p25, p50, p95, p99 and max, rounded to the millisecond."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"n": len(values), "min": round(ordered[0], 3), "p25": at(0.25), "p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 3)}


def summarize(clients, duration, steps, elapsed, outcomes, latencies, seeded, rss) -> dict:
    after_warmup = [value for t, value in rss if t >= WARMUP_FRACTION * duration]
    first, last = (after_warmup[0], after_warmup[-1]) if after_warmup else (0, 0)
    done = outcomes.get("done", 0)
    refused = outcomes.get("rejected", 0)
    failed = {kind: n for kind, n in outcomes.items() if kind not in ("done", "rejected") and n}
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else None
    mb = 2**20
    return {
        "clients": clients, "duration_s": duration, "elapsed_s": round(elapsed, 1), "steps": steps,
        "requests": done + refused + sum(failed.values()), "accepted": done + sum(failed.values()),
        "done": done, "failed": failed, "rejected_503": refused,
        "samples_per_s": round(done / elapsed, 2),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(quantiles[18], 3) if quantiles else None,
        "seeded_checks": len(seeded), "seeded_mismatches": seeded.count(False),
        "rss_mb": [round(value / mb, 1) for _, value in rss],
        "rss_mb_after_warmup": round(first / mb, 1), "rss_mb_end": round(last / mb, 1),
        "rss_mb_max_after_warmup": round(max(after_warmup, default=0) / mb, 1),
        "rss_growth": round((last - first) / first, 4) if first else None,
        "rss_max_growth": round((max(after_warmup) - first) / first, 4) if first else None,
    }


def failures(result: dict) -> list[str]:
    problems = []
    if result["failed"]:
        problems.append(f"{sum(result['failed'].values())} accepted streams or requests did not end with done: "
                        f"{result['failed']}")
    if result["done"] == 0:
        problems.append("no stream finished")
    if result["seeded_checks"] == 0 or result["seeded_mismatches"]:
        problems.append(f"seeded request: {result['seeded_mismatches']} of {result['seeded_checks']} differed "
                        "from its answer alone")
    if result["rss_growth"] is not None and result["rss_growth"] > RSS_GROWTH_LIMIT:
        problems.append(f"memory grew {result['rss_growth']:.1%} after the warm-up (limit {RSS_GROWTH_LIMIT:.0%})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model of the server this script starts")
    parser.add_argument("--url", help="a running server instead (loopback only)")
    parser.add_argument("--pid", type=int, help="its process id, for the memory figures")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (1-1024)")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds during which streams start")
    parser.add_argument("--grace", type=float, default=300.0, help="seconds streams may take to end afterwards")
    parser.add_argument("--steps", type=int, default=32, help="denoising steps of each stream")
    parser.add_argument("--stream-every", type=int, default=None, help="a step event every N steps (default steps/8)")
    parser.add_argument("--max-rows", type=int, default=32, help="SEDD_MAX_ROWS of the server this script starts")
    parser.add_argument("--threads", type=int, default=None,
                        help="SEDD_TORCH_THREADS of the server this script starts (default: the server's own)")
    parser.add_argument("--heartbeat", type=float, default=None,
                        help="SEDD_STREAM_HEARTBEAT_S of the server this script starts (default 15)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 1024 or not 0 < args.duration <= 3600:
        parser.error("--clients must be 1-1024 and --duration 0-3600 s")
    proc = None
    if args.url:
        if httpx.URL(args.url).host not in LOOPBACK:
            parser.error("the load test only targets loopback addresses")
        url, pid = args.url, args.pid
    else:
        env = {"SEDD_MAX_ROWS": str(args.max_rows), "SEDD_MAX_QUEUE": str(args.clients + 4)}
        if args.threads is not None:
            env["SEDD_TORCH_THREADS"] = str(args.threads)
        if args.heartbeat is not None:
            env["SEDD_STREAM_HEARTBEAT_S"] = str(args.heartbeat)
        proc, url = start_server(args.model, env)
        pid = proc.pid
    load_before = os.getloadavg()
    try:
        result = asyncio.run(run_load(url, args.clients, args.duration, args.steps, pid, args.grace,
                                      args.stream_every))
    finally:
        if proc is not None:
            stop_server(proc)
    result["torch_threads"] = args.threads if proc is not None else None
    result["heartbeat_s"] = args.heartbeat if proc is not None else None
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    problems = failures(result)
    if args.json:
        print(json.dumps({**result, "failures": problems}))
    else:
        for key, value in result.items():
            if key not in ("rss_mb", "event_loop"):
                print(f"{key:>24}: {value}")
        for key, value in result["event_loop"].items():
            print(f"{key:>24}: {value}")
        print(f"{'rss_mb (every s)':>24}: {result['rss_mb']}")
        print("OK" if not problems else "FAILED: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
