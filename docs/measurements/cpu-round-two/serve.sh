#!/bin/bash
# usage: serve.sh PORT [ENV=VAL ...]; prints the server pid
cd "$(dirname "$0")/../../.." && mkdir -p /tmp/cpu-perf
port=$1; shift
env SEDD_MODEL=default SEDD_DEVICE=cpu SEDD_LOG_LEVEL=warning "$@" .venv/bin/python -m uvicorn app.main:create_app --factory --host 127.0.0.1 --port $port --log-level warning > /tmp/cpu-perf/server-$port.log 2>&1 &
echo $! > /tmp/cpu-perf/server-$port.pid
for i in $(seq 1 300); do
  curl -sf http://127.0.0.1:$port/health >/dev/null && break
  sleep 0.2
done
cat /tmp/cpu-perf/server-$port.pid
