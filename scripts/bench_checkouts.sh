#!/usr/bin/env bash
# One request's time (`sedd bench --sections request`) from two checkouts taking turns, so that the
# machine's drift hits both alike. Each checkout needs its own .venv (`make install` in it).
#
#   scripts/bench_checkouts.sh BEFORE_DIR AFTER_DIR [ROUNDS] [MODEL]
#   e.g. git worktree add ../before 0270b83 && (cd ../before && make install)
#        scripts/bench_checkouts.sh ../before . 3 default
set -euo pipefail
before=$1 after=$2 rounds=${3:-3} model=${4:-default}
out=$(mktemp -d)
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    dir=$before; [ "$side" = after ] && dir=$after
    echo "### $side round $round $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd "$dir" && .venv/bin/sedd bench --model "$model" --sections request --repeats 5 --threads 2 --json \
       2>/dev/null > "$out/$side-$round.json")
    python3 - "$out/$side-$round.json" <<'PY'
import json, sys
q = json.load(open(sys.argv[1]))["one_request"]
print("ours median %.3f min %.3f | naive median %.3f | speedup median %.2f paired %.2f" % (
    q["ours_s"]["median"], q["ours_s"]["min"], q["naive_s"]["median"], q["speedup_authors_median"],
    q["speedup_authors_paired"]))
PY
  done
done
