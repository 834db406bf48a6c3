"""`graphsurgeon tune --tune-search N`: the strategy's own hyperparameters are tuned by short
searches first, and the real search runs with the best of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_tune_search_tunes_the_strategy_then_searches(digits, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable, "-m", "graphsurgeon.cli", "tune", str(digits["model"]),
            "--profile", "x86-avx512-vnni", "--calib", str(digits["train"]),
            "--eval", str(digits["test"]), "--budget", "6", "--tune-search", "2",
            "--tune-search-evals", "4", "--strategy-option", "pop_size=4",
            "--measure-front", "1", "-q", "-o", str(out),
        ],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    trials = [line for line in r.stdout.splitlines() if line.startswith("tune-search trial")]
    assert len(trials) == 2 and "mutation_rate" in trials[0]
    assert "tune-search: best" in r.stdout and "pop_size" not in r.stdout.split("best")[-1]
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["evaluations"] == 6
    assert (out / "policy.yaml").exists()
