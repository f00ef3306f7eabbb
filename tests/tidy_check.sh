#!/usr/bin/env bash
# Fails if clang-tidy (.clang-tidy) reports anything in the library, tool or plugin sources
# that this build compiles (its compile_commands.json lists them: a build without MPI, UCX or
# CUDA has no flags for those plugins' sources, which need their headers).
# usage: tidy_check.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
source_dir=$(cd "$1" && pwd)
grep -o '"file": "[^"]*"' "$2/compile_commands.json" | sed 's/^"file": "//; s/"$//' |
  grep -E "^$source_dir/(core/src|core/tools|plugins)/.*\.cpp$" | sort -u | tr '\n' '\0' |
  xargs -0 -P "$(nproc)" -n 4 clang-tidy -p "$2" --quiet
