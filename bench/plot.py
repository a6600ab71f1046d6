#!/usr/bin/env python3
"""Turns attnfuse-bench JSON (Google Benchmark's --benchmark_out) into plots.

    python3 bench/plot.py OUT_DIR RESULTS.json [MORE.json ...]

Writes, for the rows it finds:
  speedup.png   fused over unfused time against n, per backend and family
  gflops.png    fused GFLOP/s against n, per backend, with the same-process
                FMA peak of that backend as a line
  memory.png    bytes of intermediates against n, fused and unfused
  table.md      the figures behind the plots, as a Markdown table

Each JSON file is one machine's run; its context (CPU, Vulkan device) names
the backend in the legends.
"""
import collections
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# one colour per family, in every plot; d = 128 dashed
COLOURS = {"sdpa": "tab:blue", "sdpa_causal": "tab:orange", "sliding_window": "tab:green", "alibi": "tab:red",
           "softcap": "tab:purple", "hard": "tab:brown", "additive": "tab:pink", "decode": "tab:gray",
           "sigmoid_causal": "tab:olive", "relu_squared": "tab:cyan"}

NAME = re.compile(r"^(?P<family>[a-z_]+)/(?P<backend>cpu|vulkan)/(?P<mode>[a-z0-9_]+)/bh:(?P<bh>\d+)/nq:(?P<nq>\d+)/nk:(?P<nk>\d+)/d:(?P<d>\d+)")


def load(paths):
    """Rows keyed by (machine label, backend, family, mode, d, n) -> figures."""
    rows, peaks = {}, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        context = data.get("context", {})
        for b in data["benchmarks"]:
            if b.get("error_occurred") or b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
                continue
            name = b["name"]
            scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
            seconds = b["real_time"] * scale
            if name.startswith("peak/"):
                backend = name.split("/")[1]
                # the line GFLOPS are read against: the build width's FMA peak
                if name.split("/")[2] == "fma":
                    peaks[(label(context, backend), backend)] = b.get("GFLOPS", 0)
                # bf16 products are read against the bf16 dot-product peak
                if name.split("/")[2] == "bf16_dot":
                    BF16_DOT_PEAKS[(label(context, backend), backend)] = b.get("GFLOPS", 0)
                continue
            m = NAME.match(name)
            if not m:
                continue
            backend = m["backend"]
            gflops = b.get("GFLOPS", 0)  # the counter is already 1e9 FLOP per second
            key = (label(context, backend), backend, m["family"], m["mode"], int(m["d"]), int(m["nk"]), int(m["nq"]), int(m["bh"]))
            rows[key] = {"seconds": seconds, "gflops": gflops, "bytes": b.get("intermediate_bytes", 0),
                         "dispatches": b.get("dispatches")}
    return rows, peaks


def label(context, backend):
    if backend == "vulkan":
        return "Vulkan on " + context.get("vulkan_device", "?").split(" (")[0]
    cpu = context.get("cpu", "")
    name = "CPU: " + (cpu.split(":")[0] if cpu else "%s cores" % context.get("num_cpus", "?"))
    # sweeps since the width became a parameter name the kernels' width; earlier ones ran 8 lanes
    width = cpu.split("kernels built for ")[1].split(" (")[0] if "kernels built for " in cpu else "AVX2"
    return "%s, %s kernels" % (name, width)


def series(rows, machine, family, mode, d, square_only=True):
    """n -> figures for one line: square problems (n_q = n_k), or decode."""
    out = {}
    for (m, _, f, mo, dd, nk, nq, bh), v in rows.items():
        if m == machine and f == family and mo == mode and dd == d and (nq == nk or not square_only):
            # several head counts at one n (lavapipe's reference shape): keep the larger run
            if nk not in out or out[nk]["bh"] < bh:
                out[nk] = dict(v, bh=bh)
    return dict(sorted(out.items()))


def machines(rows):
    return sorted({(k[0], k[1]) for k in rows})


def families(rows, machine):
    return sorted({k[2] for k in rows if k[0] == machine and k[2] != "decode"})


def per_machine(rows, out_dir, filename, title, ylabel, draw, ybase=10, legend=None):
    """One panel per machine, n on a log-2 axis; draw(ax, machine, backend) adds the lines."""
    ms = machines(rows)
    fig, axes = plt.subplots(1, len(ms), figsize=(6.5 * len(ms), 4.5), squeeze=False)
    for ax, (machine, backend) in zip(axes[0], ms):
        draw(ax, machine, backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=ybase)
        ax.set_xlabel("n (queries = keys)")
        ax.set_ylabel(ylabel)
        ax.set_title(machine)
        ax.legend(**(legend or {"fontsize": 6, "ncol": 2}))
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, filename), dpi=110)


def plot_speedup(rows, out_dir):
    def draw(ax, machine, _):
        for family in families(rows, machine):
            for d, style in ((64, "-"), (128, "--")):
                fused, unfused = series(rows, machine, family, "fused", d), series(rows, machine, family, "unfused", d)
                ns = [n for n in fused if n in unfused]
                if ns:
                    ax.plot(ns, [unfused[n]["seconds"] / fused[n]["seconds"] for n in ns], style, marker="o", ms=3,
                            color=COLOURS.get(family), label="%s d=%d" % (family, d))
        ax.axhline(1.0, color="grey", lw=0.8)

    per_machine(rows, out_dir, "speedup.png", "attnfuse: fused over unfused", "unfused time / fused time", draw,
                ybase=2)


BF16_DOT_PEAKS = {}


def plot_gflops(rows, peaks, out_dir):
    def draw(ax, machine, backend):
        for family in families(rows, machine):
            fused = series(rows, machine, family, "fused", 64)
            if fused:
                ax.plot(list(fused), [v["gflops"] for v in fused.values()], marker="o", ms=3, color=COLOURS.get(family),
                        label=family + " fused d=64")
        for mode, style in (("fused_f16", (0, (3, 1))), ("fused_bf16", (0, (1, 1))), ("fused_bf16_fp32_products", (0, (4, 1, 1, 1)))):
            s = series(rows, machine, "sdpa", mode, 64)
            if s:
                ax.plot(list(s), [v["gflops"] for v in s.values()], linestyle=style, marker="^", ms=3, color=COLOURS["sdpa"],
                        label="sdpa " + mode + " d=64")
        for mode, style in (("unfused", ":"), ("openblas_unfused", "-."), ("openblas_skylakex_unfused", (0, (5, 2))),
                            ("naive_loops", "--")):
            s = series(rows, machine, "sdpa", mode, 64)
            if s:
                ax.plot(list(s), [v["gflops"] for v in s.values()], linestyle=style, marker="x", ms=3, color="black",
                        label="sdpa " + mode + " d=64")
        peak = peaks.get((machine, backend))
        if peak:
            ax.axhline(peak, color="black", lw=1.2, label="FMA peak %.0f" % peak)
        dot_peak = BF16_DOT_PEAKS.get((machine, backend))
        if dot_peak:
            ax.axhline(dot_peak, color="black", lw=1.2, linestyle="--", label="bf16 dot peak %.0f" % dot_peak)

    per_machine(rows, out_dir, "gflops.png", "attnfuse: throughput against the peak",
                "GFLOP/s (4 n^2 d per head; masked rows count dense)", draw)


def plot_memory(rows, out_dir):
    def draw(ax, machine, _):
        for mode, style in (("fused", "-"), ("unfused", "--")):
            s = series(rows, machine, "sdpa", mode, 64)
            if s:
                ax.plot(list(s), [max(v["bytes"], 1) for v in s.values()], style, marker="o", ms=3,
                        label="sdpa %s (bh as run)" % mode)

    per_machine(rows, out_dir, "memory.png", "attnfuse: memory besides inputs and output", "bytes of intermediates (1 = none)",
                draw, legend={"fontsize": 7})


def write_table(rows, peaks, out_dir):
    lines = ["| machine | family | d | n | bh | fused ms | unfused ms | fused / unfused | fused GFLOP/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for machine, _ in machines(rows):
        for family in families(rows, machine) + ["decode"]:
            for d in (64, 128):
                fused = series(rows, machine, family, "fused", d, square_only=family != "decode")
                unfused = series(rows, machine, family, "unfused", d, square_only=family != "decode")
                for n, v in fused.items():
                    u = unfused.get(n)
                    lines.append("| %s | %s | %d | %d | %d | %.3f | %s | %s | %.1f |" % (
                        machine, family, d, n, v["bh"], v["seconds"] * 1e3, "%.3f" % (u["seconds"] * 1e3) if u else "",
                        "%.2f×" % (u["seconds"] / v["seconds"]) if u else "", v["gflops"]))
    for (machine, backend), peak in sorted(peaks.items()):
        lines.append("| %s | FMA peak | | | | | | | %.1f |" % (machine, peak))
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    rows, peaks = load(sys.argv[2:])
    if not rows:
        print("plot.py: no attnfuse-bench rows in " + " ".join(sys.argv[2:]), file=sys.stderr)
        return 1
    plot_speedup(rows, out_dir)
    plot_gflops(rows, peaks, out_dir)
    plot_memory(rows, out_dir)
    write_table(rows, peaks, out_dir)
    print("plot.py: wrote speedup.png, gflops.png, memory.png, table.md to " + out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
