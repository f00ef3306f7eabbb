#!/bin/sh
# The in-process suite under ThreadSanitizer: ranks are threads of one process there, so
# a data race between ranks (or with the layer's exchange thread, or a host stream's
# progress thread) shows up as a report. Builds only what that suite needs, without the
# MPI, UCX and CUDA plugins, in BUILD_DIR; any report fails.
# usage: tests/threads/run.sh [BUILD_DIR]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(cd "$here/../.." && pwd)
build=${1:-build-tsan}
tests="core_stream core_layer core_layer_backward core_runtime_matrix core_runtime_model core_model_backward core_expert_slots plugins_transport_conformance core_bootstrap"
cmake -S "$source_dir" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSWITCHYARD_WERROR=ON \
  -DSWITCHYARD_WITH_MPI=OFF -DSWITCHYARD_WITH_UCX=OFF -DSWITCHYARD_WITH_CUDA=OFF \
  -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
  -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread \
  -DCMAKE_MODULE_LINKER_FLAGS=-fsanitize=thread >/dev/null
# shellcheck disable=SC2086
cmake --build "$build" -j "$(nproc)" --target $tests
# OpenBLAS's own threads are not instrumented: one thread each, so its work stays on the
# calling (instrumented) thread.
export OPENBLAS_NUM_THREADS=1
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
for t in $tests; do
  echo "threads: $t"
  "$build/bin/$t" >"$build/$t.log" 2>&1 || { tail -60 "$build/$t.log"; echo "$t failed under ThreadSanitizer"; exit 1; }
done
echo "ThreadSanitizer: no report"
