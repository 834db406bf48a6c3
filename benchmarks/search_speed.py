"""Search throughput before and after: one code revision against the working tree, side by side.

Each strategy runs ``graphsurgeon.search.tune`` on the digits CNN (batch 64, latency model,
accuracy drop <= 0.05) with the same budget, seed and workers, once with the code of
``--base`` and once with the code of ``--after`` (each a ``git archive`` snapshot, imported
through ``PYTHONPATH``; ``--after worktree``: the installed working tree), alternating which goes first in each round. Every run starts from
its own copy of the same latency table (so neither inherits the other's node timings) and its
own database (no cached evaluations). Reported per strategy: policies per second of the
search loop (``evaluations_per_s``: budget / search seconds, baselines and measuring
excluded), the policies actually run per second (``evaluated_per_s``: duplicates a strategy
asks again are read back, not run), and the hypervolume (mean and spread over the runs), with
the after/before ratio.

    python benchmarks/search_speed.py [--base e0909c1] [--after HEAD] [--apply C1,C2]
        [--strategies random,ga,ppo,bo] [--budget 100] [--workers 2] [--rounds 1] [--seeds 0,1,2]

Results go to benchmarks/results/search-speed-digits-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"

RUN = r"""
import json, sys, time
from graphsurgeon.search.tune import tune
import graphsurgeon
args = json.loads(sys.argv[1])
m = args["models"]
r = tune(m + "/digits_cnn.onnx", profile="x86-avx512-vnni", out_dir=args["out"],
         calib=m + "/digits_train.npz", eval_data=m + "/digits_test.npz",
         strategy=args["strategy"], budget=args["budget"], workers=args["workers"],
         shapes={"input": [64, 1, 8, 8]}, max_accuracy_drop=0.05, max_samples=256,
         seed=args["seed"], measure_front=0, progress=False, write_outputs=False)
print("RESULT " + json.dumps({"code": graphsurgeon.__file__, "search_s": r.search_s,
      "evaluations": r.evaluations, "evaluated": r.evaluated, "failed": r.failed,
      "evaluations_per_s": r.evaluations / r.search_s, "hypervolume": r.hypervolume}))
"""


def snapshot(rev: str, dest: Path) -> Path:
    """``rev``'s files, laid out so ``PYTHONPATH=dest`` imports them as the package does
    installed (``graphsurgeon.passes`` is the top-level ``passes`` folder, and so on)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for sub in ("passes", "kernels", "hardware_profiles"):
        if (dest / sub).is_dir() and not (dest / "graphsurgeon" / sub).exists():
            (dest / "graphsurgeon" / sub).symlink_to(dest / sub, target_is_directory=True)
    return dest


def run_one(
    code: Path | None, strategy: str, seed: int, args: argparse.Namespace, tmp: Path
) -> dict:
    out = Path(tempfile.mkdtemp(dir=tmp))
    cache = out / "cache"
    source = Path(os.environ.get("GRAPHSURGEON_CACHE") or Path.home() / ".cache/graphsurgeon")
    if (source / "latency").is_dir():
        shutil.copytree(source / "latency", cache / "latency")
    env = {**os.environ, "GRAPHSURGEON_CACHE": str(cache)}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    payload = {
        "models": str(MODELS),
        "out": str(out / "run"),
        "strategy": strategy,
        "budget": args.budget,
        "workers": args.workers,
        "seed": seed,
    }
    proc = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(payload)],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def _short(rev: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="e0909c1", help="the 'before' git revision")
    ap.add_argument("--after", default="HEAD", help="the 'after' revision, or worktree")
    ap.add_argument(
        "--apply",
        default="",
        help="commits or patch files (comma-separated) applied on top of --after: measures "
        "those changes alone (e.g. --after BASE --apply C1,fix.patch)",
    )
    ap.add_argument("--strategies", default="random,ga,ppo,bo")
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seeds", default="0", help="search seeds, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/search-speed-digits-cpu.json"))
    args = ap.parse_args()
    rev = _short(args.base)
    after_rev = None if args.after == "worktree" else _short(args.after)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="gs-speed-") as tmp_dir:
        tmp = Path(tmp_dir)
        base = snapshot(rev, tmp / "base")
        after = snapshot(after_rev, tmp / "after") if after_rev else None
        for commit in filter(None, args.apply.split(",")):
            if after is None:
                raise SystemExit("--apply needs an --after revision")
            diff = (
                Path(commit).read_bytes()
                if Path(commit).is_file()
                else subprocess.run(
                    ["git", "-C", str(ROOT), "diff", f"{commit}^", commit],
                    check=True,
                    capture_output=True,
                ).stdout
            )
            subprocess.run(["git", "apply", "-"], cwd=after, input=diff, check=True)
        turn = 0
        for r in range(args.rounds):
            for seed in [int(s) for s in args.seeds.split(",")]:
                for strategy in args.strategies.split(","):
                    order = [("before", base), ("after", after)]
                    if turn % 2:
                        order.reverse()
                    turn += 1
                    for label, code in order:
                        result = {"seed": seed, **run_one(code, strategy, seed, args, tmp)}
                        runs.setdefault(strategy, {}).setdefault(label, []).append(result)
                        line = json.dumps(result)
                        print(f"round {r} {strategy:7s} {label:6s} {line}", flush=True)
    summary = {}
    for strategy, by in runs.items():
        row: dict[str, Any] = {}
        for label in ("before", "after"):
            ok = [x for x in by.get(label, []) if "error" not in x]
            for x in ok:  # policies actually run (not read back as duplicates) per second
                x.setdefault("evaluated_per_s", x["evaluated"] / x["search_s"])
            if ok:
                row[label] = {
                    k: round(sum(x[k] for x in ok) / len(ok), 4)
                    for k in (
                        "evaluations_per_s",
                        "evaluated_per_s",
                        "search_s",
                        "evaluated",
                        "hypervolume",
                    )
                }
                hv = [x["hypervolume"] for x in ok]
                row[label]["hypervolume_std"] = round(float(np.std(hv)), 4)
        if "before" in row and "after" in row:
            row["speedup"] = round(
                row["after"]["evaluations_per_s"] / row["before"]["evaluations_per_s"], 2
            )
        summary[strategy] = row
        print(f"{strategy:7s} {json.dumps(row)}")
    cpus = os.cpu_count()
    result = {
        "device": f"{platform.machine()}, {cpus} cpus (shared with other jobs, noisy)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": "digits_cnn (batch 64), profile x86-avx512-vnni, latency model",
        "base": rev,
        "after": (after_rev or "working tree") + (f" + {args.apply}" if args.apply else ""),
        "budget": args.budget,
        "workers": args.workers,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
