#!/usr/bin/env bash
# Installs the Debian 12 packages that building and testing Switchyard need.
# Packages already present are left alone; nothing is installed when all are there.
set -euo pipefail

packages=(
  build-essential cmake make pkg-config
  libboost-dev            # Boost.DLL (header-only) for the plugin loader
  libtomlplusplus-dev     # TOML configuration
  nlohmann-json3-dev      # safetensors header parsing
  libopenblas-dev         # expert GEMMs
  libdlpack-dev           # DLTensor interop
  libopenmpi-dev openmpi-bin  # transport_mpi and mpirun
  libucx-dev ucx-utils    # transport_ucx (ucx_info shows the transports UCX sees)
  doctest-dev             # tests
  clang-format clang-tidy # the format and tidy tests
  python3-numpy           # example scripts that write .npy inputs
  time                    # /usr/bin/time -v: the peak-RSS test
  clang libclang-rt-14-dev  # libFuzzer targets (tests/fuzz)
  python3-dev pybind11-dev python3-pytest  # the Python module and its tests
  python3-torch           # the PyTorch example and its tests (CPU)
  chromium                # the simulator's HTML report, checked in a headless browser
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
