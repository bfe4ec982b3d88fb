#!/bin/bash
# The measuring run of docs/benchmarks.md "CPU, round two".
# usage: measure.sh PART "ARMS..."   PART: loop | flops | one | bench
# Arms: P2 = the new defaults (all cores; OMP_WAIT_POLICY=PASSIVE, which app/__init__ sets), P1 = PASSIVE with
# SEDD_TORCH_THREADS=1; S2 / S1 = libgomp's default wait policy (spin; an empty OMP_WAIT_POLICY reads as unset)
# with 2 / 1 threads. S1 is the old default. QUICK=1 shrinks everything for a smoke run.
cd "$(dirname "$0")/../../.." && mkdir -p /tmp/cpu-perf
R=${R:-/tmp/cpu-perf/results}; mkdir -p $R
PORT=8741
arm_env() { case $1 in P2) echo "OMP_WAIT_POLICY=PASSIVE";; P1) echo "OMP_WAIT_POLICY=PASSIVE SEDD_TORCH_THREADS=1";;
  S2) echo "OMP_WAIT_POLICY=";; S1) echo "OMP_WAIT_POLICY= SEDD_TORCH_THREADS=1";; esac; }
stamp() { echo "$(date -u +%H:%M:%S) $(cut -d' ' -f1-3 /proc/loadavg) $*" | tee -a $R/log.txt; }
part=$1; arms=$2
if [[ -n $QUICK ]]; then DUR=3; REQ1=1; REQ8=1; REP=1; else DUR=10; REQ1=7; REQ8=3; REP=5; fi

for arm in $arms; do
  out=$R/$part-$arm-$(date -u +%H%M%S).json
  case $part in
  loop)
    stamp "loop $arm start"
    env $(arm_env $arm) timeout 300 .venv/bin/python scripts/load_test.py --clients 64 --duration $DUR --steps 16 \
        --stream-every 1 --heartbeat 1 --grace 150 --json > $out
    stamp "loop $arm end rc=$?";;
  flops|one)
    docs/measurements/cpu-round-two/serve.sh $PORT $(arm_env $arm) > /dev/null
    stamp "$part $arm start"
    if [[ $part == flops ]]; then
      timeout 300 .venv/bin/python scripts/bench_server.py http://127.0.0.1:$PORT --mode json --concurrency 8 \
          --steps 64 --requests-per-client $REQ8 --warmup 2 --matmul-rate --json > $out
    else
      timeout 300 .venv/bin/python scripts/bench_server.py http://127.0.0.1:$PORT --mode json --concurrency 1 \
          --steps 128 --requests-per-client $REQ1 --warmup 2 --json > $out
    fi
    stamp "$part $arm end rc=$?"
    kill $(cat /tmp/cpu-perf/server-$PORT.pid); sleep 1;;
  bench)
    stamp "bench $arm start"
    env $(arm_env $arm) timeout 300 .venv/bin/sedd bench --model default --sections request --repeats $REP \
        --baselines authors --threads 2 --json --quiet > $out
    stamp "bench $arm end rc=$?";;
  esac
done
