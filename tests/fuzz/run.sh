#!/bin/sh
# Builds the libFuzzer targets with clang (core instrumented, AddressSanitizer and UBSan)
# in BUILD_DIR and runs each for SECONDS from its seed corpus (copied, so the repository's
# corpus stays as it is). Any crash, leak, sanitizer report or timeout fails.
# usage: tests/fuzz/run.sh [BUILD_DIR [SECONDS]]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(cd "$here/../.." && pwd)
build=${1:-build-fuzz}
seconds=${2:-20}
cmake -S "$source_dir" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER=clang++ -DSWITCHYARD_FUZZ=ON -DSWITCHYARD_WERROR=ON >/dev/null
cmake --build "$build" -j "$(nproc)" --target fuzz_npy fuzz_safetensors fuzz_config fuzz_store
for target in npy safetensors config store; do
  work="$build/fuzz-corpus/$target"
  rm -rf "$work" && mkdir -p "$work"
  cp "$here/corpus/$target"/* "$work"/
  echo "fuzz_$target: $seconds s"
  # -timeout: one input taking longer than 5 s is a hang; -rss_limit_mb: one input may not
  # make the reader hold more than 512 MiB.
  "$build/bin/fuzz_$target" -max_total_time="$seconds" -timeout=5 -rss_limit_mb=512 \
    -max_len=4096 -print_final_stats=1 "$work" 2>"$build/fuzz_$target.log" ||
    { tail -40 "$build/fuzz_$target.log"; echo "fuzz_$target found a failure"; exit 1; }
  grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$build/fuzz_$target.log" |
    sed "s/^/  /"
done
echo "fuzzers: no failure"
