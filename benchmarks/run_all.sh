#!/bin/sh
# Run the host's own benchmarks one after the other (about 7 minutes in all); the others (PostgreSQL,
# litellm[proxy], a million-request database) run alone: see the README.
# Each prints its table, its ratios and PASS/MISS per target, and exits 0: they measure, they do not test.
# Extra arguments are not passed on; run a script alone to change its options (--help lists them).
set -e
cd "$(dirname "$0")/.."
export LITELLM_LOCAL_MODEL_COST_MAP=True
for name in startup host_only scale overhead ttft; do
    echo "== $name"
    python "benchmarks/$name.py"
    echo
done
