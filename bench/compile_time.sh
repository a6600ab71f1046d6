#!/usr/bin/env bash
# Compile-time benchmark: how long g++ takes for attnfuse expressions of
# growing depth, through the DSL alone and through each backend, and for the
# project's heaviest translation units (the zoo, the variant tests, the
# benchmark). Template cost is a cost users pay on every build; this keeps it
# in view.
#
#   bash bench/compile_time.sh [BUILD_DIR]     (after a build: it reads BUILD_DIR/compile_commands.json)
#
# Prints a Markdown table; one compile at a time, so that the figures are
# not two compiles sharing two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
[[ -f $build/compile_commands.json ]] || { echo "compile_time.sh: no $build/compile_commands.json; build first" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

seconds() {  # seconds of wall time for one command
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null || { echo "compile_time.sh: this compile failed: $*" >&2; exit 1; }
  end=$(date +%s.%N)
  awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }'
}

# the flags a user's translation unit gets from attnfuse::cpu and attnfuse::vulkan
flags=(-std=c++20 -O2 -fopenmp -Idsl -Ibackends/cpu/include -Ibackends/vulkan/include -I"$build/backends/vulkan/generated")
grep -q avx2 /proc/cpuinfo && grep -q fma /proc/cpuinfo && flags+=(-march=x86-64-v3)

# An attention whose score is wrapped in `depth` elementwise layers (soft-cap,
# bias, masks...), the shape of expression a user builds up.
unit() {  # depth backend
  local depth=$1 backend=$2
  {
    echo '#include <attnfuse/dsl.hpp>'
    [[ $backend == cpu ]] && echo '#include <attnfuse/cpu.hpp>'
    [[ $backend == vulkan ]] && echo '#include <attnfuse/vulkan/executor.hpp>'
    echo 'using namespace attnfuse;'
    echo 'int main() {'
    echo '    matrix<"Q"> Q; matrix<"K"> K; matrix<"V"> V; matrix<"B"> B;'
    echo '    std::vector<float> data(64 * 64, 0.5f);'
    echo '    auto s0 = scale(Q^T*K);'
    for ((k = 1; k <= depth; ++k)); do
      case $((k % 4)) in
        1) echo "    auto s$k = s$((k - 1)) + B;" ;;
        2) echo "    auto s$k = 30 * tanh(s$((k - 1)) / 30);" ;;
        3) echo "    auto s$k = mask(s$((k - 1)), causal);" ;;
        0) echo "    auto s$k = s$((k - 1)) - 0.5 * abs(i - j);" ;;
      esac
    done
    echo "    auto e = softmax(s$depth)*V;"
    echo '    auto q = bind(Q, data.data(), 64, 64); auto k = bind(K, data.data(), 64, 64);'
    echo '    auto v = bind(V, data.data(), 64, 64); auto b = bind(B, data.data(), 64, 64);'
    case $backend in
      dsl) echo '    return int(to_string(e).size() + reference::evaluate(e, q, k, v, b).values.size());' ;;
      cpu) echo '    return int(cpu::run(e, q, k, v, b).output.values.size());' ;;
      vulkan) echo '    vulkan::device dev; return int(vulkan::run(dev, e, q, k, v, b).output.values.size());' ;;
    esac
    echo '}'
  } > "$work/depth_${depth}_$backend.cpp"
  echo "$work/depth_${depth}_$backend.cpp"
}

echo "| translation unit | dsl only s | + CPU backend s | + Vulkan backend s |"
echo "|---|---:|---:|---:|"
for depth in 0 1 2 4 8 16; do
  row="| softmax(s)*V, s = $depth elementwise layers over scale(Q^T*K) |"
  for backend in dsl cpu vulkan; do
    row+=" $(seconds g++ "${flags[@]}" -c "$(unit "$depth" "$backend")" -o "$work/out.o") |"
  done
  echo "$row"
done

# The issue-pinned unit: one file that runs a causal attention on the CPU and
# on Vulkan, its wall time and the compiler's peak memory (GNU time).
causal=$work/causal_cpu_vulkan.cpp
cat > "$causal" <<'CPP'
#include <attnfuse/cpu.hpp>
#include <attnfuse/vulkan/executor.hpp>
#include <vector>
using namespace attnfuse;
int main() {
    matrix<"Q"> Q; matrix<"K"> K; matrix<"V"> V;
    std::vector<float> data(64 * 64, 0.5f);
    auto q = bind(Q, data.data(), 64, 64); auto k = bind(K, data.data(), 64, 64); auto v = bind(V, data.data(), 64, 64);
    const auto e = softmax(mask(scale(Q^T*K), causal))*V;
    vulkan::device dev;
    return int(cpu::run(e, q, k, v).output.values.size() + vulkan::run(dev, e, q, k, v).output.values.size());
}
CPP
[[ -x /usr/bin/time ]] || { echo "compile_time.sh: needs GNU time for the peak memory (apt-get install time)" >&2; exit 1; }
start=$(date +%s.%N)
/usr/bin/time -f "%M" -o "$work/peak_kb" g++ "${flags[@]}" -c "$causal" -o "$work/out.o"
end=$(date +%s.%N)
echo
echo "| one file: causal attention on the CPU and on Vulkan | s | peak MB |"
echo "|---|---:|---:|"
echo "| \`softmax(mask(scale(Q^T*K), causal))*V\`, cpu::run and vulkan::run | $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') | $(awk '{ printf "%.0f", $1 / 1024 }' "$work/peak_kb") |"

echo
echo "| project translation unit | s |"
echo "|---|---:|"
for source in examples/zoo.cpp tests/test_variants.cpp tests/test_cpu.cpp tests/test_vulkan.cpp bench/attnfuse_bench.cpp; do
  command=$(/usr/bin/python3 - "$build/compile_commands.json" "$PWD/$source" <<'PY'
import json, sys
for entry in json.load(open(sys.argv[1])):
    if entry["file"] == sys.argv[2]:
        print(entry["directory"] + "\t" + entry["command"])
        break
PY
)
  [[ -n $command ]] || continue
  directory=${command%%$'\t'*}
  line=${command#*$'\t'}
  # the same command, its object file elsewhere
  line=$(sed -E "s# -o [^ ]+# -o $work/project.o#" <<<"$line")
  echo "| \`$source\` | $(cd "$directory" && seconds bash -c "$line") |"
done
