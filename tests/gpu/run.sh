#!/usr/bin/env bash
# The GPU check, in one run on a bare machine with an NVIDIA GPU, CUDA 13 (nvcc, cuBLAS),
# NCCL (CUDA's prefix or the nvidia-nccl wheel), CMake and ninja, but none of the Debian
# libraries the build uses: they come as .deb files fetched beforehand on a Debian machine
# (scripts/fetch-gpu-deps.sh, into .gpu-deps/) and are unpacked into a private prefix here.
#
# It builds the project with CUDA (Release, the GPU's architecture), runs every CTest
# labelled `gpu`, runs examples/configs/gpu.toml with --check on one GPU and on all of them,
# runs the GPU benchmarks (bench_gpu, and tests/gpu/mixtral_compare.py against
# transformers), runs the tests again under compute-sanitizer's memcheck, and prints
# the tables last (the benchmarks' figures against the aims they are held to at the very
# end), within a time budget (SWITCHYARD_GPU_BUDGET_S, default 480 s): the memory checker
# runs last, in the time left.
#
# usage: tests/gpu/run.sh              the whole check (needs a GPU)
#        tests/gpu/run.sh --deps-only  unpack the packages and configure a build against
#                                      them alone (checks the fetched files on any machine)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
deps=${SWITCHYARD_GPU_DEPS:-$root/.gpu-deps}
work=${SWITCHYARD_GPU_WORK:-$root/build-gpu}
mode=${1:-all}
start=$SECONDS
say() { echo "gpu-run [$((SECONDS - start)) s]: $*"; }

# 1. The Debian packages, unpacked into a private prefix.
[ -f "$deps/MANIFEST" ] || { echo "gpu-run: $deps/MANIFEST missing: run scripts/fetch-gpu-deps.sh first" >&2; exit 2; }
prefix=$work/prefix
rm -rf "$prefix"
mkdir -p "$prefix"
while read -r deb; do
  [ -f "$deps/$deb" ] || { echo "gpu-run: $deps/$deb listed but missing" >&2; exit 2; }
  dpkg-deb -x "$deps/$deb" "$prefix" 2>/dev/null || {
    # Without dpkg: a .deb is an ar archive holding data.tar.*.
    (cd "$prefix" && ar p "$deps/$deb" "$(ar t "$deps/$deb" | grep '^data.tar')" | tar -x -J -f - 2>/dev/null ||
      ar p "$deps/$deb" "$(ar t "$deps/$deb" | grep '^data.tar')" | tar -x -f -)
  }
done < "$deps/MANIFEST"
usr=$prefix/usr
say "unpacked $(wc -l < "$deps/MANIFEST") packages into $prefix"

# 2. NCCL: CUDA's prefix, else the wheel PyTorch brought.
nccl_root=${NCCL_ROOT:-}
if [ -z "$nccl_root" ]; then
  cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
  if [ ! -f "$cuda_home/include/nccl.h" ]; then
    # The wheel's layout differs between versions (nvidia/nccl, nvidia/cu13): find nccl.h.
    site=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)
    header=$( [ -n "$site" ] && find "$site/nvidia" -name nccl.h -path '*include*' 2>/dev/null | head -1 || true)
    [ -n "$header" ] && nccl_root=$(dirname "$(dirname "$header")")
  fi
fi
[ -n "$nccl_root" ] && say "NCCL from $nccl_root"

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
arch=${CMAKE_CUDA_ARCHITECTURES:-}
if [ -z "$arch" ] && command -v nvidia-smi >/dev/null; then
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
fi
arch=${arch:-90}
configure=(cmake -S "$root" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
  -DSWITCHYARD_WITH_CUDA=ON -DSWITCHYARD_WITH_MPI=OFF -DSWITCHYARD_WITH_UCX=OFF
  -DSWITCHYARD_WITH_OPENBLAS=OFF -DSWITCHYARD_WITH_PYTHON=OFF -DSWITCHYARD_WERROR=OFF
  -DCMAKE_CUDA_ARCHITECTURES="$arch"
  -DCMAKE_IGNORE_PREFIX_PATH=/usr -DCMAKE_PREFIX_PATH="$usr"
  -DBoost_DIR="$usr/lib/x86_64-linux-gnu/cmake/Boost-1.74.0"
  -Dboost_headers_DIR="$usr/lib/x86_64-linux-gnu/cmake/boost_headers-1.74.0"
  -Dtomlplusplus_DIR="$usr/lib/x86_64-linux-gnu/cmake/tomlplusplus"
  -Dnlohmann_json_DIR="$usr/share/cmake/nlohmann_json"
  -Ddoctest_DIR="$usr/lib/cmake/doctest"
  -DCMAKE_CXX_FLAGS="-isystem $usr/include")
[ -n "$nccl_root" ] && configure+=(-DNCCL_ROOT="$nccl_root")
export LD_LIBRARY_PATH=$usr/lib/x86_64-linux-gnu${nccl_root:+:$nccl_root/lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"${configure[@]}" > "$work/configure.log" 2>&1 || { cat "$work/configure.log"; exit 1; }
grep -E "Switchyard (backend|NCCL)" "$work/configure.log" | sed 's/^-- /gpu-run: /'
say "configured for sm_$arch"
if [ "$mode" = "--deps-only" ]; then
  say "dependencies complete: the build configured against $prefix alone"
  exit 0
fi

# 3. Build, the gpu tests, then the same under compute-sanitizer.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# Only what this script runs (another compiler's new warnings must not stop a GPU run: CI
# builds everything with warnings as errors).
targets=(switchyard-tool bench_gpu $(cd "$work/build" && ctest -N -L gpu | sed -n 's/^ *Test *#[0-9]*: //p'))
cd "$work/build"
status=0
# Keep going past a target that fails to build: the rest still runs and reports.
keep_going=(-- -k 0); [ ${#generator[@]} -eq 0 ] && keep_going=(-- -k)
if cmake --build . -j "$(nproc)" --target "${targets[@]}" "${keep_going[@]}" > "$work/build.log" 2>&1; then
  say "built ${#targets[@]} targets"
else
  grep -E -B2 -A6 "error|Error" "$work/build.log" | head -80
  say "BUILD FAILED for some targets (see $work/build.log); running what was built"
  status=1
fi
# A lease of GPU time is short: the script keeps to a budget, and what it must report (the
# tests, the end-to-end runs, the benchmarks) runs before the memory checker, which gets
# what is left.
budget=${SWITCHYARD_GPU_BUDGET_S:-480}
left() { echo $((budget - (SECONDS - start))); }
ctest -L gpu --output-on-failure --timeout 150 | tee "$work/ctest.log" || status=1
say "gpu tests done"

# 4. End to end on 1 GPU and on all of them: switchyard run under the launcher, checked
#    against the dense reference.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "${gpus:-0}" -ge 1 ] || gpus=1
runs=()
for n in $(printf '%s\n' 1 "$gpus" | sort -un); do
  if timeout 120 bin/switchyard launch -n "$n" -- bin/switchyard run "$root/examples/configs/gpu.toml" --check \
      > "$work/run-$n.log" 2>&1; then
    runs+=("$n GPU(s): $(grep -o 'PASS' "$work/run-$n.log" | head -1 || echo ok) ($(grep -m1 -o 'max |y - reference|.*' "$work/run-$n.log" || true))")
  else
    runs+=("$n GPU(s): FAILED (see $work/run-$n.log)")
    status=1
  fi
  tail -3 "$work/run-$n.log"
done
# Several ranks on one GPU: in-process ranks (threads) share the device, their rows going
# between them through pinned host memory; y must equal world 1's within bf16 rounding.
for n in 1 4; do
  if timeout 120 bin/switchyard run "$root/examples/configs/gpu.toml" --check \
      --set runtime.transport=inproc --set runtime.ranks=$n --set output.path="$work/y-inproc-$n.npy" \
      > "$work/run-inproc-$n.log" 2>&1; then
    runs+=("$n ranks on GPU 0 (inproc): $(grep -o 'PASS' "$work/run-inproc-$n.log" | head -1 || echo ok) ($(grep -m1 -o 'max |y - reference|.*' "$work/run-inproc-$n.log" || true))")
  else
    runs+=("$n ranks on GPU 0 (inproc): FAILED (see $work/run-inproc-$n.log)")
    status=1
  fi
  tail -2 "$work/run-inproc-$n.log"
done
if [ -f "$work/y-inproc-1.npy" ] && [ -f "$work/y-inproc-4.npy" ]; then
  runs+=("world 4 against world 1 on one GPU: $(python3 -c '
import sys, numpy as np
a, b = np.load(sys.argv[1]).astype(np.float64), np.load(sys.argv[2]).astype(np.float64)
r = np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)
print(("PASS" if r <= 2e-2 else "FAIL") + f" (max |y4 - y1| / max |y1| = {r:.3g})")' \
    "$work/y-inproc-1.npy" "$work/y-inproc-4.npy" 2>&1 || echo "comparison failed")")
fi
say "end-to-end runs done"

# 5. Benchmarks: kernels against the device's references, the layer against transformers.
bench_kernels=$(timeout 120 bin/bench_gpu kernels 2> "$work/bench.err") ||
  { status=1; bench_kernels="$bench_kernels
bench_gpu kernels failed: $(tail -3 "$work/bench.err")"; }
echo "$bench_kernels"
say "kernel benchmarks done"
mixtral=$(timeout 260 python3 "$root/tests/gpu/mixtral_compare.py" bin/bench_gpu "$work/mixtral" 2> "$work/mixtral.err") ||
  { status=1; mixtral="$mixtral
mixtral_compare.py failed: $(tail -3 "$work/mixtral.err")"; }
echo "$mixtral"
say "layer benchmark done"

# 6. compute-sanitizer's memcheck on each gpu test, in the time left.
sanitizer=$(command -v compute-sanitizer || echo "$(dirname "$(command -v nvcc)")/compute-sanitizer")
memcheck=()
if [ -x "$sanitizer" ]; then
  for test in $(ctest -L gpu -N | sed -n 's/^ *Test *#[0-9]*: //p'); do
    if [ "$(left)" -lt 30 ]; then memcheck+=("$test: not run (budget spent)"); continue; fi
    limit=$(left); [ "$limit" -gt 150 ] && limit=150
    code=0
    # API errors are not reported: NCCL probes for kernels of other architectures and
    # records the failed calls, by design; the tests check every call of their own.
    timeout "$limit" "$sanitizer" --tool memcheck --report-api-errors no --error-exitcode 99 "bin/$test" \
      > "$work/memcheck-$test.log" 2>&1 || code=$?
    case $code in
      0) memcheck+=("$test: clean") ;;
      77) memcheck+=("$test: skipped ($(grep -m1 SKIPPED "$work/memcheck-$test.log"))") ;;
      124) memcheck+=("$test: TIMED OUT after $limit s"); status=1 ;;
      *) if grep -q "Device not supported" "$work/memcheck-$test.log"; then
           memcheck+=("$test: compute-sanitizer does not support this device here")
         else
           memcheck+=("$test: FAILED, exit $code (see $work/memcheck-$test.log)"); status=1
         fi ;;
    esac
    say "memcheck $test: ${memcheck[-1]#*: }"
  done
else
  memcheck+=("compute-sanitizer not found: not run")
fi
say "memcheck done"

echo
echo "| check | result |"
echo "| --- | --- |"
skipped=$(grep -c '(Skipped)' "$work/ctest.log" || true)
grep -E "tests passed|tests failed" "$work/ctest.log" | sed "s/^/| ctest -L gpu | /; s/\$/ ($skipped skipped) |/"
for line in "${memcheck[@]}"; do echo "| memcheck ${line%%:*} | ${line#*: } |"; done
for line in "${runs[@]}"; do echo "| switchyard run gpu.toml --check, ${line%%:*} | ${line#*: } |"; done
echo "| wall time | $((SECONDS - start)) s |"
echo
echo "$bench_kernels"
echo
echo "| layer at world 1 (T = 8192, bf16) | switchyard | transformers MixtralSparseMoeBlock | speed-up | agreement |"
echo "| --- | --- | --- | --- | --- |"
echo "$mixtral"
echo
bash "$root/tests/gpu/aims.sh" "$bench_kernels" "$mixtral"
exit $status
