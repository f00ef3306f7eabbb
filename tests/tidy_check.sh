#!/usr/bin/env bash
# Fails if clang-tidy (.clang-tidy) reports anything in the library, tool or plugin sources.
# usage: tidy_check.sh SOURCE_DIR BUILD_DIR (the build's compile_commands.json is used)
set -euo pipefail
cd "$1"
find core/src core/tools plugins -name '*.cpp' -print0 |
  xargs -0 -P "$(nproc)" -n 4 clang-tidy -p "$2" --quiet
