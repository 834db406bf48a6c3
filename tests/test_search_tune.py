"""`graphsurgeon tune` end to end on the digits CNN: outputs, replay, cache, failures, resume.

Budgets are tiny (a few policies, fast methods); the resume test kills a real subprocess with
SIGKILL in the middle of its search and checks that `--resume` loses no finished evaluation.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

import graphsurgeon as gs
from graphsurgeon.cli import main
from graphsurgeon.execution import make_session, run
from graphsurgeon.search import evaluate as evaluate_module
from graphsurgeon.search.tune import tune

FAST = "prune-magnitude,prune-nm,share-weights"


def _args(
    digits, out, *extra: str, strategy: tuple[str, ...] = ("--strategy-option", "pop_size=4")
) -> list[str]:
    return [
        "tune", str(digits["model"]), "--profile", "x86-avx512-vnni",
        "--calib", str(digits["train"]), "--eval", str(digits["test"]),
        "--methods", FAST, *strategy, "--measure-front", "2",
        "-o", str(out), "-q", *extra,
    ]  # fmt: skip


def _accuracy(model_path, digits, n: int = 256) -> float:
    data = np.load(digits["test"])
    logits = run(make_session(gs.load(model_path)), {"input": data["input"][:n]})["logits"]
    return float(np.mean(logits.argmax(-1) == data["labels"][:n]))


def test_tune_writes_a_measured_front_and_a_replayable_policy(digits, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(digits, out, "--budget", "8", "--max-accuracy-drop", "0.05")) == 0
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["evaluations"] == 8 and pareto["front"]
    for point in pareto["front"]:
        assert point["kinds"]["latency_ms"] == "measured"
        assert point["objectives"]["accuracy_drop"] <= 0.05
    names = {b["name"] for b in pareto["baselines"]}
    assert {"original", "ort-quantize-dynamic", "ort-quantize-static"} <= names
    # the reported accuracy is the best model's real accuracy
    best = pareto["best"]
    base = _accuracy(digits["model"], digits)
    assert _accuracy(out / "best.onnx", digits) == pytest.approx(
        base - best["objectives"]["accuracy_drop"], abs=1e-9
    )
    # policy.yaml replays to the same model
    replayed = gs.run_pipeline(gs.load(digits["model"]), str(out / "policy.yaml")).model
    x = np.load(digits["test"])["input"][:64]
    np.testing.assert_allclose(
        run(make_session(replayed), {"input": x})["logits"],
        run(make_session(gs.load(out / "best.onnx")), {"input": x})["logits"],
        rtol=1e-5,
        atol=1e-5,
    )
    assert "<svg" in (out / "report.html").read_text()
    # the database commands
    capsys.readouterr()
    assert main(["policies", "list", "--storage", str(out), "--json", "--pareto"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["pareto"] for r in rows)
    assert main(["policies", "show", str(best["id"]), "--storage", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["metrics"]["latency_ms"]["kind"] == "measured"
    assert (
        main(
            [
                "policies",
                "export",
                str(best["id"]),
                "--storage",
                str(out),
                "-o",
                str(tmp_path / "p.yaml"),
            ]
        )
        == 0
    )
    assert (tmp_path / "p.yaml").read_text() == (out / "policy.yaml").read_text()
    # the study exists: no silent overwrite
    assert main(_args(digits, out, "--budget", "8")) == 2
    assert "already exists" in capsys.readouterr().err


def test_results_are_cached_across_studies(digits, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    kw = dict(
        profile="x86-avx512-vnni", calib=digits["train"], eval_data=digits["test"],
        methods=FAST, budget=6, storage=storage, strategy_options={"pop_size": 3},
        measure_front=0, progress=False, write_outputs=False,
    )  # fmt: skip
    first = tune(digits["model"], out_dir=tmp_path / "a", **kw)
    second = tune(digits["model"], out_dir=tmp_path / "b", **kw)
    assert first.evaluated > 0 and second.evaluated == 0  # same model, data, profile, seed
    assert second.evaluations == 6


def test_a_failing_policy_is_recorded_and_the_search_goes_on(digits, tmp_path, monkeypatch):
    real = evaluate_module.Evaluator.apply

    def flaky(self, policy):
        if "prune-nm" in json.dumps(getattr(policy, "to_dict", lambda: policy)()):
            raise RuntimeError("injected failure")
        return real(self, policy)

    monkeypatch.setattr(evaluate_module.Evaluator, "apply", flaky)
    result = tune(
        digits["model"], profile="x86-avx512-vnni", calib=digits["train"],
        eval_data=digits["test"], methods="prune-nm,prune-magnitude", budget=8,
        strategy_options={"pop_size": 4}, out_dir=tmp_path / "f", measure_front=0,
        progress=False, write_outputs=False, seed=1,
    )  # fmt: skip
    assert result.evaluations == 8 and 0 < result.failed < 8
    db = sqlite3.connect(tmp_path / "f" / "search.db")
    errors = [e for (e,) in db.execute("select error from policies where status='failed'")]
    assert errors and all("injected failure" in e for e in errors)


@pytest.mark.parametrize(
    "strategy",
    [("--strategy-option", "pop_size=4"), ("--strategy", "bo")],
    ids=["ga-batches", "bo-asynchronous"],
)
def test_resume_after_kill_loses_no_finished_evaluation(digits, tmp_path, strategy):
    out = tmp_path / "r"
    args = _args(digits, out, "--budget", "20", "--seed", "3", strategy=strategy)
    code = f"from graphsurgeon.cli import main; raise SystemExit(main({args!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    db_path = out / "search.db"
    deadline = time.monotonic() + 90
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if db_path.exists():
            try:
                with sqlite3.connect(db_path) as db:
                    done = db.execute(
                        "select count(*) from policies where stage='search'"
                    ).fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if done >= 6:
                break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db_path) as db:
        before = db.execute(
            "select id, key, status from policies where stage='search' order by id"
        ).fetchall()
    assert len(before) >= 6
    assert main([*args, "--resume"]) == 0
    pareto = json.loads((out / "pareto.json").read_text())
    with sqlite3.connect(db_path) as db:
        after = db.execute(
            "select id, key, status from policies where stage='search' order by id"
        ).fetchall()
    assert after[: len(before)] == before  # nothing lost or rewritten
    assert len({k for _, k, _ in after}) == len(after)  # nothing evaluated twice
    assert pareto["evaluations"] == 20
    assert pareto["evaluated"] == len(after) - len(before)


def test_fgsm_robustness_is_harder_than_noise_of_the_same_size(digits):
    from graphsurgeon.search.evaluate import EvalConfig, Evaluator

    def drop(kind: str) -> float:
        config = EvalConfig(
            model=str(digits["model"]), profile="x86-avx512-vnni", calib=str(digits["test"]),
            noise=0.3, robustness=kind, max_samples=128,
        )  # fmt: skip
        ev = Evaluator(config)
        result = ev.evaluate([])  # the original model itself
        assert result.status == "ok", result.error
        assert result.kinds["robustness_drop"].startswith(
            kind.replace("gaussian", "gaussian noise")
        )
        return result.objectives["robustness_drop"]

    fgsm, gaussian = drop("fgsm"), drop("gaussian")
    assert fgsm > gaussian + 0.05 and fgsm > 0.1


def test_ga_lineage_is_recorded_and_shown(digits, tmp_path, capsys):
    out = tmp_path / "g"
    tune(
        digits["model"], profile="x86-avx512-vnni", calib=digits["train"],
        eval_data=digits["test"], methods=FAST, budget=12, out_dir=out, measure_front=0,
        strategy_options={"pop_size": 4, "crossover_rate": 0.6, "immigrant_rate": 0.0},
        progress=False, write_outputs=False, seed=2,
    )  # fmt: skip
    db = sqlite3.connect(out / "search.db")
    rows = db.execute(
        "select id, parents, generation, vector from policies where stage='search' order by id"
    ).fetchall()
    by_id = {i: (json.loads(p), g, json.loads(v)) for i, p, g, v in rows}
    bred = {i: r for i, r in by_id.items() if r[0]}
    assert bred and {len(r[0]) for r in bred.values()} == {1, 2}  # mutations and crossovers
    for child, (parents, generation, vector) in bred.items():
        assert generation >= 1
        for parent in parents:  # an earlier policy of this search
            assert parent < child and parent in by_id and by_id[parent][1] < generation
        # the child's genes are its parents' but for a few mutated ones
        genes = np.array(vector)
        near = np.min([np.sum(~np.isclose(genes, by_id[p][2])) for p in parents])
        assert near < len(genes)
    child = max(bred, key=lambda i: (by_id[i][1], i))
    capsys.readouterr()
    assert main(["policies", "show", str(child), "--storage", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["parents"] == by_id[child][0]
    assert shown["made_by"] == ("crossover" if len(by_id[child][0]) == 2 else "mutation")
    first = [a for a in shown["lineage"] if a["up"] == 1]
    assert sorted(a["id"] for a in first) == sorted(by_id[child][0])
    assert all("accuracy_drop" in a["objectives"] and a["policy"] for a in first)
    # random search breeds nothing: its policies have no parents
    tune(
        digits["model"], profile="x86-avx512-vnni", calib=digits["train"],
        eval_data=digits["test"], methods=FAST, budget=3, out_dir=tmp_path / "r",
        strategy="random", measure_front=0, progress=False, write_outputs=False,
    )  # fmt: skip
    db = sqlite3.connect(tmp_path / "r" / "search.db")
    assert {p for (p,) in db.execute("select parents from policies")} == {"[]"}
