"""`graphsurgeon tune --tune-search N`: the strategy's own hyperparameters are tuned by short
searches first, and the real search runs with the best of them."""

from __future__ import annotations

import json
import os
import re
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


def test_tune_search_tunes_the_reward_lambda_of_a_reward_driven_strategy(
    digits, tmp_path: Path, capsys
) -> None:
    import sqlite3

    from graphsurgeon.cli import main

    out = tmp_path / "ppo"
    args = [
        "tune", str(digits["model"]), "--profile", "x86-avx512-vnni",
        "--calib", str(digits["train"]), "--eval", str(digits["test"]),
        "--methods", "prune-magnitude,share-weights", "--strategy", "ppo",
        "--strategy-option", "episodes=3", "--budget", "3", "--tune-search", "2",
        "--tune-search-evals", "3", "--lambda", "0.7", "--measure-front", "0", "-q",
        "-o", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    trials = [line for line in text.splitlines() if line.startswith("tune-search trial")]
    assert len(trials) == 2 and all("'lambda'" in t and "'lam'" not in t for t in trials)
    found = re.search(r"tune-search: best \{.*'lambda': ([0-9.e+-]+)", text)
    assert found, text
    best = float(found.group(1))

    def search_lambdas(db_path: Path) -> dict[str, float]:
        with sqlite3.connect(db_path) as db:
            rows = db.execute("select name, config from studies").fetchall()
        return {n: json.loads(c)["search_lambda"] for n, c in rows}

    inner = search_lambdas(out / "tune-search" / "search.db")
    assert len(inner) == 2 and len(set(inner.values())) == 2  # each trial its own lambda
    assert best in inner.values()
    (final,) = search_lambdas(out / "search.db").values()
    assert final == best  # the real search learns from the tuned lambda ...
    pareto = json.loads((out / "pareto.json").read_text())
    with sqlite3.connect(out / "search.db") as db:
        (config,) = db.execute("select config from studies").fetchone()
    assert json.loads(config)["lambda"] == 0.7  # ... and the pick keeps the user's
    assert pareto["evaluations"] == 3
    # NSGA-II never reads the reward: lambda is not a knob there
    ga = [*args[:11], "ga", "--strategy-option", "pop_size=3", *args[14:-1], str(tmp_path / "ga")]
    ga[ga.index("--tune-search") + 1] = "1"
    assert main(ga) == 0
    text = capsys.readouterr().out
    assert "lambda is not tuned: ga does not steer by the reward" in text
    assert all("'lambda'" not in t for t in text.splitlines() if "trial" in t)
