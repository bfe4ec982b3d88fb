#!/usr/bin/env python3
"""The measuring run of docs/benchmarks.md "CPU, round three": servers started as `make serve` starts them,
arms taking turns, each measured with scripts/bench_server.py against the matmul rate of its own dtype.

    python scripts/bench_cpu_bf16.py                       # the four arms below, 1 round, results in docs/measurements/cpu-bf16/
    python scripts/bench_cpu_bf16.py --rounds 1 --quick    # a smoke run
    python scripts/bench_cpu_bf16.py --arm bf16=. --arm fp32=.:SEDD_DTYPE=float32 --rounds 3

An arm is NAME=WHERE[:VAR=VALUE...]. WHERE is `.` (this checkout) or `@REV` (that commit, exported with
`git archive` into /tmp/sedd-bench-REV, with its own .venv that its `make serve` builds the first time).
Each arm's server is `make -C WHERE serve HOST=127.0.0.1 PORT=...` with the arm's variables added to this
environment (minus any SEDD_*): what a user gets from `make serve`, a fresh server per measurement. The
default arms:

    before      @BEFORE_REV                          the code before issue 23: float32 on a CPU, eager
    fp32        .:SEDD_DTYPE=float32:SEDD_COMPILE=0  this code in float32, eager (as before)
    bf16-eager  .:SEDD_COMPILE=0                     bf16 (on a CPU with native bf16), eager: what the dtype
                                                     alone pays, and what an image without a compiler gets
    bf16        .                                    this code as `make serve` starts it: auto dtype (bf16 on a
                                                     CPU with native bf16), SEDD_COMPILE=auto (the compiled
                                                     step where a C++ compiler is present)

Per round the arms run in order and then in reverse (A B C D D C B A), so that drift in the machine's load hits
them alike. Per arm and turn, against one fresh server:
  one  1 client, 7 JSON requests of the defaults (128 steps, 1 sample) after 2 warm-up requests: the
       median latency, and its ratio to the time one request's network FLOPs take at the matmul rate
  8x64 8 clients, 3 one-sample requests each of 64 steps: full-network FLOP/s over wall time against the
       matmul rate
bench_server measures the rate in the server's dtype (20 x 1024^3 products, before and after its load);
this driver also times both float32 and bfloat16 rates right after each measurement, so every arm can be
read against the bf16 rate. Before each arm it waits (up to --quiet-wait s) for the 1-minute load average
to fall below --quiet-load, and records the load averages next to every number.

Writes, into --out (default docs/measurements/cpu-bf16/): one JSON per measurement (bench_server's report plus the
driver's context), log.txt, summary.json and summary.md (printed at the end too).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]
from bench_server import matmul_rate  # noqa: E402

from app.openmp import WAIT_VARIABLES  # noqa: E402

BEFORE_REV = "96bdb8c"  # main before issue 23 (the base of the bf16 branch)
DEFAULT_ARMS = [f"before=@{BEFORE_REV}", "fp32=.:SEDD_DTYPE=float32:SEDD_COMPILE=0", "bf16-eager=.:SEDD_COMPILE=0", "bf16=."]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"{now()} load {load_average()} {message}"
        print(line, file=sys.stderr, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def parse_arm(spec: str) -> dict:
    name, _, rest = spec.partition("=")
    where, *assignments = rest.split(":")
    env = dict(a.split("=", 1) for a in assignments)
    if not name or not where:
        raise SystemExit(f"bench_cpu_bf16: bad --arm {spec!r}; write NAME=WHERE[:VAR=VALUE...]")
    return {"name": name, "where": where, "env": env}


def checkout(where: str, log: Log) -> Path:
    """The folder of `.` or `@REV` (exported once with git archive)."""
    if where == ".":
        return ROOT
    if not where.startswith("@"):
        return Path(where).resolve()
    rev = where[1:]
    folder = Path(tempfile.gettempdir()) / f"sedd-bench-{rev}"
    if not (folder / "Makefile").is_file():
        log(f"exporting {rev} into $TMPDIR/{folder.name}")
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def arm_environment(arm: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEDD_") and k not in WAIT_VARIABLES}
    env.update(arm["env"])
    return env


def prepare(arm: dict, folder: Path, log: Log) -> None:
    """Build the checkout's .venv as `make serve` would, outside the timed part."""
    where = "this checkout" if arm["where"] == "." else f"the export of {arm['where'][1:]}"
    log(f"{arm['name']}: make .venv/.runtime in {where}")
    subprocess.run(["make", "-C", str(folder), ".venv/.runtime"], check=True, env=arm_environment(arm),
                   stdout=subprocess.DEVNULL)


def start_server(arm: dict, folder: Path, timeout: float, log: Log) -> tuple[subprocess.Popen, str, float, dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(["make", "-C", str(folder), "serve", "HOST=127.0.0.1", f"PORT={port}"],
                            env=arm_environment(arm), stdout=server_log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.server_log = server_log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                ready_s = time.perf_counter() - start
                info = httpx.get(url + "/v1/model", timeout=10).json()
                log(f"{arm['name']}: server ready in {ready_s:.1f} s ({info.get('dtype')}, "
                    f"{info.get('dtype_choice', 'no dtype_choice')}, compiled={info.get('compiled')})")
                return proc, url, ready_s, info
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    server_log.seek(0)
    raise SystemExit(f"bench_cpu_bf16: the {arm['name']} server did not get ready:\n"
                     f"{server_log.read().decode(errors='replace')[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_quiet(threshold: float, patience: float, log: Log) -> float:
    """Seconds waited for the 1-minute load average to fall below `threshold` (at most `patience`)."""
    start = time.monotonic()
    if os.getloadavg()[0] >= threshold and patience > 0:
        log(f"waiting up to {patience:.0f} s for the 1-minute load average to fall below {threshold}")
    while os.getloadavg()[0] >= threshold and time.monotonic() - start < patience:
        time.sleep(10)
    return time.monotonic() - start


def bench(url: str, args: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_server.py"), url, "--mode", "json",
                          "--matmul-rate", "--json", *args], capture_output=True, text=True, timeout=1800)
    if out.returncode not in (0, 1) or not out.stdout.strip():
        raise SystemExit(f"bench_cpu_bf16: bench_server failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def rates() -> dict[str, float]:
    return {dtype: round(matmul_rate(dtype=dtype), 1) for dtype in ("float32", "bfloat16")}


def measure(kind: str, url: str, quick: bool) -> dict:
    if kind == "one":
        return bench(url, ["--concurrency", "1", "--steps", "128", "--requests-per-client", "2" if quick else "7",
                           "--warmup", "1" if quick else "2"])
    return bench(url, ["--concurrency", "8", "--steps", "64", "--requests-per-client", "1" if quick else "3",
                       "--warmup", "1" if quick else "2"])


def entry_of(kind: str, arm: dict, report: dict, after: dict[str, float], context: dict) -> dict:
    level = report["levels"][0]
    own = report["matmul_rate"]
    own_rate = (own["before_gflops"] + own["after_gflops"]) / 2
    flops_per_request = report["num_samples"] * report["steps"] * own["flops_per_sample_step"]
    entry = {"kind": kind, "arm": arm["name"], **context, "dtype": own["dtype"], "own_rate_gflops": own_rate,
             "rates_after_gflops": after, "load_average": report["load_average"], "errors": level["errors"]}
    if kind == "one":
        median = statistics.median(level["latencies_s"])
        entry.update(median_s=median, latencies_s=level["latencies_s"],
                     over_own_matmul_time=median / (flops_per_request / (own_rate * 1e9)),
                     over_bf16_matmul_time=median / (flops_per_request / (after["bfloat16"] * 1e9)))
    else:
        entry.update(gflops=level["gflops"], of_own_rate=level["gflops"] / own_rate,
                     of_bf16_rate=level["gflops"] / after["bfloat16"], samples_per_s=level["samples_per_s"],
                     rows_per_pass=level["rows_per_pass"])
    return entry


def summarise(entries: list[dict]) -> str:
    lines = ["| arm | dtype | one /sample, 128 steps: median s per turn | x network FLOPs at own / bf16 rate "
             "| 8 x 64 steps: GFLOP/s per turn | of own rate | of bf16 rate | load averages (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(e["arm"] for e in entries):
        ones = [e for e in entries if e["arm"] == arm and e["kind"] == "one"]
        eights = [e for e in entries if e["arm"] == arm and e["kind"] == "8x64"]
        dtype = (ones or eights)[0]["dtype"]
        loads = [e["load_average"]["before"][0] for e in ones + eights]
        cells = [", ".join(f"{e['median_s']:.3f}" for e in ones),
                 ", ".join(f"{e['over_own_matmul_time']:.1f}x / {e['over_bf16_matmul_time']:.1f}x" for e in ones),
                 ", ".join(f"{e['gflops']:.0f}" for e in eights),
                 ", ".join(f"{e['of_own_rate']:.0%}" for e in eights),
                 ", ".join(f"{e['of_bf16_rate']:.0%}" for e in eights)]
        lines.append(f"| {arm} | {dtype} | " + " | ".join(cells) + f" | {min(loads):.2f}-{max(loads):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", default=None, help="NAME=WHERE[:VAR=VALUE...] (repeatable; "
                                                                 f"default: {' '.join(DEFAULT_ARMS)})")
    p.add_argument("--rounds", type=int, default=1, help="palindromic rounds (A B C D D C B A each; default 1)")
    p.add_argument("--out", default=str(ROOT / "docs" / "measurements" / "cpu-bf16"), help="results folder")
    p.add_argument("--quiet-load", type=float, default=1.0, help="wait for a 1-minute load average below this")
    p.add_argument("--quiet-wait", type=float, default=300, help="longest wait for it before an arm, seconds")
    p.add_argument("--startup-timeout", type=float, default=1200, help="seconds for a server to get ready "
                                                                       "(a compiled server compiles first)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer requests")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "log.txt")
    arms = [parse_arm(spec) for spec in (args.arm or DEFAULT_ARMS)]
    folders = {arm["name"]: checkout(arm["where"], log) for arm in arms}
    for arm in arms:
        prepare(arm, folders[arm["name"]], log)
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": sys.version.split()[0],
               "torch": _torch_version(), "commit": _commit()}
    log(f"start: {machine}, arms {[a['name'] + '=' + a['where'] + ''.join(f':{k}={v}' for k, v in a['env'].items()) for a in arms]}, {args.rounds} rounds")
    entries = []
    for round_index in range(args.rounds):
        for turn, arm in enumerate(arms + arms[::-1]):
            waited = wait_quiet(args.quiet_load, args.quiet_wait, log)
            proc, url, ready_s, info = start_server(arm, folders[arm["name"]], args.startup_timeout, log)
            try:
                for kind in ("one", "8x64"):
                    stamp = dt.datetime.now(dt.timezone.utc).strftime("%H%M%S")
                    report = measure(kind, url, args.quick)
                    after = rates()
                    context = {"round": round_index + 1, "turn": turn + 1, "time": now(), "waited_s": round(waited),
                               "server_ready_s": round(ready_s, 1), "server": info, "machine": machine}
                    entry = entry_of(kind, arm, report, after, context)
                    (out / f"{kind}-{arm['name']}-r{round_index + 1}t{turn + 1}-{stamp}.json").write_text(
                        json.dumps({"entry": entry, "bench_server": report}, indent=2))
                    entries.append(entry)
                    shown = (f"median {entry['median_s']:.3f} s, {entry['over_own_matmul_time']:.2f}x own / "
                             f"{entry['over_bf16_matmul_time']:.2f}x bf16 matmul time" if kind == "one" else
                             f"{entry['gflops']:.0f} GFLOP/s = {entry['of_own_rate']:.0%} of own "
                             f"({entry['own_rate_gflops']:.0f}), {entry['of_bf16_rate']:.0%} of bf16 "
                             f"({after['bfloat16']:.0f})")
                    log(f"{arm['name']} {kind}: {shown}; rates after {after}")
            finally:
                stop_server(proc)
    table = summarise(entries)
    (out / "summary.json").write_text(json.dumps({"machine": machine, "arms": arms, "entries": entries}, indent=2))
    (out / "summary.md").write_text(f"Measured {entries[0]['time']} to {entries[-1]['time']} on {machine}\n\n"
                                    f"{table}\n")
    print(table)
    return 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _torch_version() -> str:
    import torch

    return torch.__version__


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" plus uncommitted changes" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
