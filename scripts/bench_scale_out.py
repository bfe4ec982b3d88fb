#!/usr/bin/env python3
"""Ray Serve with 1, then 2 (or --replicas) replicas on a local Ray instance: samples/s and latency at 1-16
clients, measured with scripts/bench_server.py through Ray's HTTP proxy. Needs 'sedd-serve[ray]'.

    python scripts/bench_scale_out.py --model tests/data/reference/tiny-five --mode json --steps 64 --duration 8

Each replica gets SEDD_TORCH_THREADS=--torch-threads (default 1) and an equal share of the CPUs Ray is given
(--num-cpus, default: this machine's). Prints one table per replica count and, with --json, the rows as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_server  # noqa: E402 - the load generator beside this script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # the rest goes to bench_server: --mode is not --model
    p.add_argument("--model", default="default")
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts (default 1,2)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule (default: all)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--max-rows", type=int, default=16)
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--json", action="store_true")
    args, rest = p.parse_known_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from app import ray_serve

    results = {}
    for replicas in [int(n) for n in args.replicas.split(",")]:
        bench_args = bench_server.parse_args([f"http://127.0.0.1:{args.port}", *rest])
        start = time.perf_counter()
        ray_serve.start_local({"model": args.model, "device": "cpu", "torch_threads": args.torch_threads,
                               "max_rows": args.max_rows, "log_level": "warning"},
                              replicas=replicas, host="127.0.0.1", port=args.port, num_cpus=args.num_cpus)
        print(f"\n{replicas} replica(s) ready in {time.perf_counter() - start:.1f} s; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr, flush=True)
        try:
            rows = asyncio.run(bench_server.main_async(bench_args))
        finally:
            ray_serve.stop_local()
        results[replicas] = rows
        print(f"\n== {replicas} replica(s), load average after: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        bench_server.print_table(rows, bench_args)
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
