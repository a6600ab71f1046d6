#!/usr/bin/env bash
# attnfuse's one entry point on a fresh Debian 12 machine:
#   bash scripts/run.sh zoo    install what is missing, build, run the attention zoo
#   bash scripts/run.sh test   install what is missing, build, run every test (ctest)
# Environment: BUILD_DIR (default build), JOBS (default nproc),
# ATTNFUSE_SANITIZE=1 (an AddressSanitizer + UBSan build in build-sanitize).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
case "$mode" in
  zoo|test) ;;
  *) echo "usage: bash scripts/run.sh zoo|test" >&2; exit 2 ;;
esac

# Debian 12 packages attnfuse builds, tests and runs with.
packages=(cmake g++ make pkg-config
          libvulkan-dev mesa-vulkan-drivers vulkan-validationlayers vulkan-tools
          glslang-dev glslang-tools spirv-tools
          catch2 libbenchmark-dev libopenblas-dev)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  install=(apt-get install -y --no-install-recommends "${missing[@]}")
  if [[ $(id -u) -eq 0 ]]; then sudo=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=(sudo -n)
  else
    echo "attnfuse needs these Debian packages, and this user cannot install them. As root, run:" >&2
    echo "  apt-get update && ${install[*]}" >&2
    exit 1
  fi
  echo "== installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" "${install[@]}"
fi

jobs=${JOBS:-$(nproc)}
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$jobs"

case "$mode" in
  zoo)
    "$build/examples/attnfuse-zoo"
    ;;
  test)
    # Validation layers on for every Vulkan test: a message fails the test.
    export VK_INSTANCE_LAYERS=VK_LAYER_KHRONOS_validation
    ctest --test-dir "$build" --output-on-failure -j "$jobs"
    if [[ ${ATTNFUSE_SANITIZE:-0} == 1 || ${CI:-} == true ]]; then
      # The CPU-side tests once more under AddressSanitizer and UBSan.
      cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g" -DATTNFUSE_SANITIZE=ON -DATTNFUSE_BUILD_BENCH=OFF -DATTNFUSE_BUILD_EXAMPLES=OFF
      cmake --build build-sanitize -j "$jobs" --target test_reference test_expressions test_variants test_cpu
      ctest --test-dir build-sanitize --output-on-failure -j "$jobs" -R '^test_(reference|expressions|variants|cpu)$'
    fi
    ;;
esac
