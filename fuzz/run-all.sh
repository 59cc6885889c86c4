#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) on its seed corpus and prints the
# executions and coverage reached. Exits non-zero if any target finds a crash.
# Usage: fuzz/run-all.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
failed=()
for target in $(RUSTC_BOOTSTRAP=1 cargo fuzz list); do
  mkdir -p "corpus/$target"
  work=$(mktemp -d)
  log=$(mktemp)
  # New inputs go to a scratch directory so the committed seed corpus stays small.
  if RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$work" "corpus/$target" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    execs=$(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -o 'cov: [0-9]*' | grep -o '[0-9]*' || echo '?')
    echo "fuzz $target: ${secs}s, ${execs} execs, cov ${cov}"
  else
    echo "fuzz $target: FAILED"
    tail -40 "$log"
    failed+=("$target")
  fi
  rm -rf "$work" "$log"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz failures: ${failed[*]}"
  exit 1
fi
