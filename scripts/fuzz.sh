#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ (one shared, uninstrumented-sanitizer build: the code is
# safe Rust, so libFuzzer's coverage guidance is what matters) and runs each for SECONDS (default
# 20) on a copy of its committed seed corpus, two at a time. Prints the build time and, per
# target, the executions run; a crash, a timeout or an out-of-memory fails the script and leaves
# the input in fuzz/artifacts/<target>/ (make it a regression test beside the code it hit).
# The build goes to SLUICE_FUZZ_TARGET_DIR (default /var/cache/sluice-fuzz, outside the checkout):
# an instrumented build of the whole dependency tree takes long cold (object_store's aws-lc-sys
# above all), and a later run on the same machine, in any clone, reuses its dependencies.
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
target_dir=${SLUICE_FUZZ_TARGET_DIR:-/var/cache/sluice-fuzz}
mkdir -p "$target_dir"
# At most this many targets run at once (the CI machine has 2 cores).
parallel=2

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install --locked cargo-fuzz
fi
started=$(date +%s)
cargo +nightly fuzz build --fuzz-dir fuzz --sanitizer none --target-dir "$target_dir"
echo "fuzz: build took $(( $(date +%s) - started )) s"

triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin="$target_dir/$triple/release"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)

run_one() {
  local target=$1
  mkdir -p "$work/$target" "fuzz/artifacts/$target"
  # New inputs go to the scratch dir (the first one); the committed seeds stay as they are.
  # -rss_limit_mb: any one input that makes a parser take this much is a finding.
  if "$bin/$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=512 \
      -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$target/" \
      "$work/$target" "fuzz/corpus/$target" >"$work/$target.log" 2>&1; then
    echo 0 >"$work/$target.rc"
  else
    echo $? >"$work/$target.rc"
  fi
}

for ((i = 0; i < ${#targets[@]}; i += parallel)); do
  for target in "${targets[@]:i:parallel}"; do
    run_one "$target" &
  done
  wait
done

failed=0
for target in "${targets[@]}"; do
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$target.log" | tail -n 1)
  rc=$(cat "$work/$target.rc")
  echo "fuzz: $target: ${execs:-?} executions in ${seconds} s, exit $rc"
  if [ "$rc" != 0 ]; then
    failed=1
    echo "fuzz: $target failed; the end of its log:" >&2
    tail -n 40 "$work/$target.log" >&2
  fi
done
exit "$failed"
