#!/usr/bin/env python3
"""Throughput of a running sedd-serve server at 1, 2, 4, 8 and 16 concurrent clients.

    python scripts/bench_server.py http://127.0.0.1:8000
    python scripts/bench_server.py http://127.0.0.1:8000 --mode json --steps 64 --requests-per-client 10
    python scripts/bench_server.py http://127.0.0.1:8000 --duration 20 --json > bench.json

Each client loops: one request (POST /sample, or /infill with --prefix/--suffix), then the next, for
--requests-per-client requests or --duration seconds. `stream` mode reads the SSE stream to its
`done` event and times the first event; `json` mode waits for the JSON answer. Per concurrency level
it prints requests/s, samples/s, p50/p95 latency, p50 time to first event, rows per model pass (from
/metrics, when readable) and samples/s relative to one client.

With --matmul-rate it also times this machine's matmul rate in this process, before the first level and
after the last (20 back-to-back 1024 x 1024 products timed together: their average, not a best sample),
in the dtype the server computes in (its GET /v1/model; or the dtype given: --matmul-rate bfloat16), and
reports each level's end-to-end rate as a fraction of it. The level's FLOPs are those of the full network
at every position (as `sedd bench` counts the naive loop: benchmarks.measure.FlopCount, trunk plus output
layer) per predictor step, times steps, times samples finished; the final denoise pass is not counted.
Each level also gets `latency_over_matmul_time`: its median latency over the time one request's network
FLOPs take at that rate (1.0 would be a request that is nothing but matmuls at the square product's
speed). --model names the server's model for that count (default: the bundled one).

    python scripts/bench_server.py http://127.0.0.1:8000 --mode json --concurrency 8 --steps 64 --matmul-rate
    python scripts/bench_server.py http://127.0.0.1:8000 --mode json --concurrency 1 --requests-per-client 7 \
        --matmul-rate bfloat16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Level:
    concurrency: int
    requests: int = 0
    samples: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_events: list[float] = field(default_factory=list)
    rows_per_pass: float | None = None
    error_messages: list[str] = field(default_factory=list)
    flops: float = 0.0  # full-network FLOPs of the finished samples (--matmul-rate)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    def summary(self, base_samples_per_s: float | None) -> dict:
        return {
            "concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
            "seconds": round(self.seconds, 3), "requests_per_s": round(self.requests_per_s, 3),
            "samples_per_s": round(self.samples_per_s, 3),
            "latency_p50_s": _round(percentile(self.latencies, 50)),
            "latency_p95_s": _round(percentile(self.latencies, 95)),
            "latency_min_s": _round(min(self.latencies, default=None)),
            "latency_max_s": _round(max(self.latencies, default=None)),
            "latencies_s": [round(v, 4) for v in self.latencies],
            "first_event_p50_s": _round(percentile(self.first_events, 50)),
            "rows_per_pass": _round(self.rows_per_pass, 2),
            "gflops": round(self.flops / self.seconds / 1e9, 2) if self.flops and self.seconds else None,
            "speedup": round(self.samples_per_s / base_samples_per_s, 2) if base_samples_per_s else None,
            "error_messages": self.error_messages[:5],
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def one_request(client: httpx.AsyncClient, args, level: Level) -> None:
    path = "/infill" if (args.prefix or args.suffix) else "/sample"
    body = {"num_samples": args.num_samples, "steps": args.steps, "length": args.length,
            "predictor": args.predictor}
    if path == "/infill":
        body.update(prefix=args.prefix, suffix=args.suffix)
    start, first_event = time.perf_counter(), None
    try:
        if args.mode == "json":
            response = await client.post(path, json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
            answer = response.json()
        else:
            answer = None
            body.update(stream=True, stream_every=args.stream_every)
            async with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
                event = None
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                        if first_event is None:
                            first_event = time.perf_counter() - start
                    elif line.startswith("data:") and event in ("done", "error"):
                        answer = json.loads(line[5:])
                        if event == "error":
                            raise RuntimeError(answer.get("error"))
                        break
            if answer is None:
                raise RuntimeError("the stream ended without a done event")
    except Exception as exc:  # noqa: BLE001 - a benchmark counts failures and goes on
        level.errors += 1
        level.error_messages.append(f"{exc.__class__.__name__}: {exc}")
        return
    level.latencies.append(time.perf_counter() - start)
    if first_event is not None:
        level.first_events.append(first_event)
    level.requests += 1
    level.samples += len(answer["samples"])
    if args.flops_per_sample_step:
        level.flops += len(answer["samples"]) * args.steps * args.flops_per_sample_step


async def client_loop(client: httpx.AsyncClient, args, level: Level, deadline: float | None) -> None:
    done = 0
    while (deadline is None and done < args.requests_per_client) or (deadline is not None
                                                                     and time.perf_counter() < deadline):
        await one_request(client, args, level)
        done += 1


async def rows_per_pass(client: httpx.AsyncClient) -> tuple[float, float] | None:
    """(sum, count) of the server's sedd_rows_per_pass histogram, or None when /metrics is not readable."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    values = {}
    for line in response.text.splitlines():
        if line.startswith(("sedd_rows_per_pass_sum", "sedd_rows_per_pass_count")):
            name, value = line.split()
            values[name] = float(value)
    if len(values) != 2:
        return None
    return values["sedd_rows_per_pass_sum"], values["sedd_rows_per_pass_count"]


async def run_level(args, concurrency: int) -> Level:
    level = Level(concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        before = await rows_per_pass(client)
        start = time.perf_counter()
        deadline = start + args.duration if args.duration else None
        await asyncio.gather(*(client_loop(client, args, level, deadline) for _ in range(concurrency)))
        level.seconds = time.perf_counter() - start
        after = await rows_per_pass(client)
    if before and after and after[1] > before[1]:
        level.rows_per_pass = (after[0] - before[0]) / (after[1] - before[1])
    return level


async def warm_up(args) -> None:
    warm = argparse.Namespace(**{**vars(args), "requests_per_client": args.warmup, "duration": None})
    if warm.requests_per_client:
        await run_level(warm, 1)


MATMUL_DTYPES = ("float32", "bfloat16", "float16")


def matmul_rate(size: int = 1024, count: int = 20, dtype: str = "float32") -> float:
    """GFLOP/s of `count` back-to-back `size` x `size` matmuls in `dtype` timed together (after one untimed)."""
    import torch

    kind = getattr(torch, dtype)
    a, b = torch.randn(size, size).to(kind), torch.randn(size, size).to(kind)
    out = torch.empty(size, size, dtype=kind)
    torch.matmul(a, b, out=out)
    start = time.perf_counter()
    for _ in range(count):
        torch.matmul(a, b, out=out)
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def flops_per_sample_step(model: str, length: int | None) -> tuple[float, int]:
    """Full-network FLOPs of one row at one step (trunk at every position plus the output layer at every
    position), and the length counted."""
    from benchmarks.measure import FlopCount
    from sedd_core import load

    lm = load(model, device="cpu")
    length = length or lm.length
    count = FlopCount.of(lm.config)
    return count.trunk(1, length) + count.output(length), length


def server_dtype(args) -> str:
    """The dtype the server computes in, from its GET /v1/model."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    response = httpx.get(args.url.rstrip("/") + "/v1/model", headers=headers, timeout=30)
    response.raise_for_status()
    dtype = response.json()["dtype"]
    if dtype not in MATMUL_DTYPES:
        raise SystemExit(f"bench_server: the server reports dtype {dtype!r}; give --matmul-rate one of "
                         f"{', '.join(MATMUL_DTYPES)}")
    return dtype


def print_table(rows: list[dict], args) -> None:
    print(f"# {args.url}  mode={args.mode} steps={args.steps} length={args.length or 'model'} "
          f"num_samples={args.num_samples} stream_every={args.stream_every if args.mode == 'stream' else '-'}")
    header = ("clients", "req/s", "samples/s", "p50 s", "p95 s", "first event p50 s", "rows/pass", "vs 1 client",
              "errors") + (("GFLOP/s", "of matmul rate") if args.matmul_rate else ())
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for row in rows:
        cells = [row["concurrency"], f"{row['requests_per_s']:.2f}", f"{row['samples_per_s']:.2f}",
                 _fmt(row["latency_p50_s"]), _fmt(row["latency_p95_s"]), _fmt(row["first_event_p50_s"]),
                 _fmt(row["rows_per_pass"], 1), f"{row['speedup']:.2f}x" if row["speedup"] else "-", row["errors"]]
        if args.matmul_rate:
            cells += [_fmt(row["gflops"], 1), f"{row['matmul_fraction']:.0%}" if row["matmul_fraction"] else "-"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.matmul_rate:
        print(f"matmul rate (20 x 1024^3 {args.matmul_rate}, GFLOP/s): before {args.matmul_before:.1f}, after "
              f"{args.matmul_after:.1f}; fractions use their mean. Median latency over the time one request's "
              f"network FLOPs take at that rate: "
              + ", ".join(f"{row['concurrency']} clients {row['latency_over_matmul_time']:.2f}x" for row in rows
                          if row.get("latency_over_matmul_time")) + "."
              f" Load average before {args.load_before}, after {args.load_after}")
    for row in rows:
        for message in row["error_messages"]:
            print(f"  {row['concurrency']} clients: {message}", file=sys.stderr)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated client counts (default 1,2,4,8,16)")
    p.add_argument("--mode", choices=("stream", "json"), default="stream", help="SSE streams or JSON answers")
    p.add_argument("--steps", type=int, default=128, help="denoising steps per request (default 128)")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default: the model's length)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per request (default 1)")
    p.add_argument("--predictor", default="analytic")
    p.add_argument("--prefix", default="", help="with --prefix/--suffix, POST /infill")
    p.add_argument("--suffix", default="")
    p.add_argument("--stream-every", type=int, default=1, help="in stream mode, a step event every N steps")
    p.add_argument("--requests-per-client", type=int, default=8, help="requests each client sends (default 8)")
    p.add_argument("--duration", type=float, default=None, help="seconds per level instead of a request count")
    p.add_argument("--warmup", type=int, default=2, help="requests before the first level (default 2)")
    p.add_argument("--api-key", default=None, help="bearer token, if the server has SEDD_API_KEY")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request before it counts as failed")
    p.add_argument("--matmul-rate", "--flops", nargs="?", const="server", default=None,
                   choices=("server", *MATMUL_DTYPES), metavar="DTYPE",
                   help="time the matmul rate here before and after the load, in DTYPE (default: the server's, "
                        "from GET /v1/model), and report each level's full-network FLOP/s as a fraction of it")
    p.add_argument("--model", default="default", help="with --matmul-rate: the server's model, for the FLOP count")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p.parse_args(argv)


async def main_async(args) -> list[dict]:
    await warm_up(args)
    args.load_before = os.getloadavg()
    if args.matmul_rate:
        args.matmul_before = matmul_rate(dtype=args.matmul_rate)
    rows, base = [], None
    for concurrency in [int(c) for c in args.concurrency.split(",") if c.strip()]:
        level = await run_level(args, concurrency)
        if base is None:
            base = level.samples_per_s or None
        rows.append(level.summary(base))
        if not args.json:
            print(f"  {concurrency:>3} clients: {level.samples_per_s:.2f} samples/s", file=sys.stderr)
    if args.matmul_rate:
        args.matmul_after = matmul_rate(dtype=args.matmul_rate)
        rate = (args.matmul_before + args.matmul_after) / 2
        matmul_s = args.num_samples * args.steps * args.flops_per_sample_step / (rate * 1e9)
        for row in rows:
            row["matmul_fraction"] = round(row["gflops"] / rate, 3) if row["gflops"] else None
            row["matmul_time_per_request_s"] = round(matmul_s, 4)
            row["latency_over_matmul_time"] = (round(row["latency_p50_s"] / matmul_s, 2)
                                               if row["latency_p50_s"] else None)
    args.load_after = os.getloadavg()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.flops_per_sample_step = None
    if args.matmul_rate:
        if args.matmul_rate == "server":
            args.matmul_rate = server_dtype(args)
        args.flops_per_sample_step, counted_length = flops_per_sample_step(args.model, args.length)
    rows = asyncio.run(main_async(args))
    if args.json:
        report = {"url": args.url, "mode": args.mode, "steps": args.steps, "length": args.length,
                  "num_samples": args.num_samples, "stream_every": args.stream_every,
                  "load_average": {"before": args.load_before, "after": args.load_after}, "levels": rows}
        if args.matmul_rate:
            report["matmul_rate"] = {"size": 1024, "count": 20, "dtype": args.matmul_rate,
                                     "before_gflops": round(args.matmul_before, 2),
                                     "after_gflops": round(args.matmul_after, 2),
                                     "flops_per_sample_step": args.flops_per_sample_step,
                                     "length_counted": counted_length}
        print(json.dumps(report, indent=2))
    else:
        print_table(rows, args)
    return 0 if all(row["errors"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
