#!/usr/bin/env bash
# Downloads the Debian 12 packages that building Switchyard needs on a GPU machine which
# has CUDA, cuBLAS, NCCL, CMake and ninja but none of Debian's libraries and no package
# registry. Run it here (a Debian machine with apt); tests/gpu/run.sh unpacks the files
# into a private prefix there (dpkg -x, never into /).
# usage: scripts/fetch-gpu-deps.sh [DIR]   (default: .gpu-deps, git-ignored)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/.gpu-deps}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

# Headers only, so nothing here must match the GPU machine's C library: Boost.DLL (plugin
# loader), toml++ (configuration, used header-only), nlohmann-json (safetensors headers),
# DLPack, doctest (tests). The GPU build leaves out OpenBLAS (the CPU experts), Open MPI and
# UCX.
packages=(libboost1.74-dev libtomlplusplus-dev nlohmann-json3-dev libdlpack-dev doctest-dev)

mkdir -p "$dir"
if ! (cd "$dir" && apt-get download "${packages[@]}" >/dev/null 2>&1); then
  apt-get update -qq
  (cd "$dir" && apt-get download "${packages[@]}")
fi
# The files of these packages (not older leftovers), which the run script unpacks and checks
# for, so that a partial copy is noticed there.
(cd "$dir" && for p in "${packages[@]}"; do ls -1 "${p}"_*.deb | tail -1; done > MANIFEST)
echo "fetch-gpu-deps: $(wc -l < "$dir/MANIFEST") packages in $dir ($(du -sh "$dir" | cut -f1))"
