#!/usr/bin/env bash
# attnfuse's one entry point on a fresh Debian 12 machine:
#   bash scripts/run.sh zoo    install what is missing, build, run the attention zoo
#   bash scripts/run.sh test   install what is missing, build, run every test (ctest)
#   bash scripts/run.sh bench  install what is missing, build, run the benchmark sweep on
#                              this machine (CPU and the default Vulkan device) and plot
#                              it with every other sweep in bench/results into docs/plots
# Environment: BUILD_DIR (default build), JOBS (default nproc),
# ATTNFUSE_SANITIZE=1 (an AddressSanitizer + UBSan build in build-sanitize).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
case "$mode" in
  zoo|test|bench) ;;
  *) echo "usage: bash scripts/run.sh zoo|test|bench" >&2; exit 2 ;;
esac

# Debian 12 packages attnfuse builds, tests and runs with.
packages=(cmake g++ make pkg-config
          libvulkan-dev mesa-vulkan-drivers vulkan-validationlayers vulkan-tools
          glslang-dev glslang-tools spirv-tools
          catch2 libbenchmark-dev libopenblas-dev)
[[ $mode == bench ]] && packages+=(python3-matplotlib)

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
  bench)
    # Google Benchmark's own flags pass through BENCH_ARGS (a filter, say).
    results=bench/results/sweep-${BENCH_LABEL:-$(hostname -s)}-$(date +%F).json
    "$build/bench/attnfuse-bench" --benchmark_min_time=0.2 --benchmark_out="$results" --benchmark_out_format=json ${BENCH_ARGS:-}
    # Debian's matplotlib belongs to Debian's python3
    /usr/bin/python3 bench/plot.py docs/plots bench/results/sweep-*.json
    ;;
  test)
    # Validation layers on for every Vulkan test: a message fails the test.
    export VK_INSTANCE_LAYERS=VK_LAYER_KHRONOS_validation
    ctest --test-dir "$build" --output-on-failure -j "$jobs"
    if [[ ${ATTNFUSE_SANITIZE:-0} == 1 || ${CI:-} == true ]]; then
      # The CPU-side tests once more under AddressSanitizer and UBSan. On a
      # machine with AVX-512 the main build runs the 16-lane kernels and this
      # one builds the 8-lane AVX2 kernels, so both widths are tested there;
      # elsewhere both builds have the one width the machine has.
      narrow=()
      if grep -qw avx512f /proc/cpuinfo && grep -qw avx2 /proc/cpuinfo; then narrow=(-DATTNFUSE_ARCH_FLAGS=-march=x86-64-v3); fi
      cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g" -DATTNFUSE_SANITIZE=ON -DATTNFUSE_BUILD_BENCH=OFF -DATTNFUSE_BUILD_EXAMPLES=OFF "${narrow[@]}"
      cmake --build build-sanitize -j "$jobs" --target test_reference test_elements test_expressions test_variants test_cpu test_cpu_storage test_cpu_backward test_robustness
      ctest --test-dir build-sanitize --output-on-failure -j "$jobs" -R '^test_(reference|elements|expressions|variants|cpu|cpu_storage|cpu_backward|robustness)$'
    fi
    ;;
esac
