"""load -> cleanup -> save on MiniLM-L6 against plain onnx.load -> onnx.save, side by side.

Each variant runs in a fresh subprocess (so peak RSS is its own), several times alternating,
and the medians are compared. Peak RSS is reported two ways: the whole process, and the growth
above the process's RSS once its imports are done (the memory the work itself needs).

Targets (from the foundation issue): time ratio <= 2, peak RSS <= 2.5x the model size.

    python benchmarks/pipeline_overhead.py [--model PATH] [--repeats 5] [--verify structural]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
variant, src, dst, verify = sys.argv[1:5]
import onnx
if variant == "graphsurgeon":
    import graphsurgeon as gs
    from graphsurgeon.pipeline import compile_pipeline
    steps = compile_pipeline("cleanup")
base = rss_kib()
t0 = time.perf_counter()
if variant == "onnx":
    onnx.save(onnx.load(src), dst)
else:
    model = gs.load(src)
    gs.run_pipeline(model, steps, verify=verify)
    gs.save(model, dst)
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print(json.dumps({"time_s": elapsed, "peak_kib": peak, "base_kib": base}))
"""


def run_child(variant: str, src: Path, dst: Path, verify: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, variant, str(src), str(dst), verify],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--verify", default="structural", choices=["structural", "off"])
    args = parser.parse_args()
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "examples"))
        import build  # examples/build.py

        model = build.build_minilm(ROOT / "examples" / "models")["model"]
    size = model.stat().st_size
    results: dict[str, list[dict]] = {"onnx": [], "graphsurgeon": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for variant in results:  # alternate, so drift in machine load hits both alike
                results[variant].append(
                    run_child(variant, model, Path(tmp) / f"{variant}.onnx", args.verify)
                )

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    t_onnx, t_gs = med("onnx", "time_s"), med("graphsurgeon", "time_s")
    rows = {}
    for v in results:
        peak = med(v, "peak_kib") * 1024
        growth = statistics.median((r["peak_kib"] - r["base_kib"]) * 1024 for r in results[v])
        rows[v] = (peak, growth)
    mib = 1 << 20
    print(f"model: {model} ({size / mib:.1f} MiB), {args.repeats} runs each, verify={args.verify}")
    print(
        f"{'variant':<14}{'time (median)':>15}{'peak RSS':>12}{'peak/size':>11}{'growth':>10}{'growth/size':>13}"
    )
    for v, t in (("onnx", t_onnx), ("graphsurgeon", t_gs)):
        peak, growth = rows[v]
        print(
            f"{v:<14}{t:>13.3f} s{peak / mib:>9.0f} MiB{peak / size:>10.2f}x{growth / mib:>6.0f} MiB{growth / size:>12.2f}x"
        )
    ratio = t_gs / t_onnx
    mem_ratio = rows["graphsurgeon"][1] / size
    print(
        f"time ratio graphsurgeon/onnx: {ratio:.2f} (target <= 2)  {'OK' if ratio <= 2 else 'MISSED'}"
    )
    print(
        f"peak RSS growth / model size: {mem_ratio:.2f}x (target <= 2.5)  {'OK' if mem_ratio <= 2.5 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
