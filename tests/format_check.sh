#!/usr/bin/env bash
# Fails if any C++ file of the repository is not clang-format clean (.clang-format).
set -euo pipefail
cd "$1"
files=$(find core plugins tests examples bindings benchmarks -name '*.cpp' -o -name '*.hpp' -o -name '*.h' -o -name '*.c' -o -name '*.cu' -o -name '*.cuh')
bad=0
for f in $files; do
  if ! clang-format --dry-run -Werror "$f" >/dev/null 2>&1; then
    echo "not clang-format clean: $f (run: make format)"
    bad=1
  fi
done
exit $bad
