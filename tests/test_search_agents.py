"""The learned search strategies (``ppo``, ``bo``), ``--tune-search`` and the Ray executor.

The toy space has real slots and real method spaces (from the pass registry); its objective
is a closed form of each slot's decision (sensitive slots lose accuracy when compressed,
every slot saves bytes), so an improvement can only come from the strategy learning it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.options import Choice, FloatRange
from graphsurgeon.search.pareto import hypervolume
from graphsurgeon.search.space import METHODS, SearchSpace, Slot
from graphsurgeon.search.strategies.base import get_strategy
from graphsurgeon.search.strategies.bo import BOStrategy, tune_search
from graphsurgeon.search.strategies.ppo import PPOStrategy

SENSITIVITY = [0.05, 0.5, 0.01, 0.2, 0.02, 1.0, 0.1, 0.03]
OBJECTIVES = ["accuracy_drop", "size_bytes"]


def toy_space(n: int = 8) -> SearchSpace:
    names = ["none", "prune-magnitude", "quantize-weights", "quantize-dynamic", "factorize-lowrank"]
    slots = []
    for i in range(n):
        methods = [METHODS[m] for m in names]
        spaces = [m.spaces() for m in methods]
        units = [f"u{i}"] if i % 3 == 2 else []
        if units:  # some slots may be removed, as remove-layers allows where legal
            methods.append(METHODS["remove"])
            spaces.append({"unit": Choice(units)})
        stats = {
            "params": 1000.0 * (i + 1),
            "macs": 1e4 * (i + 1),
            "out_channels": 64.0,
            "in_channels": 64.0,
            "sensitivity": SENSITIVITY[i % len(SENSITIVITY)],
        }
        unit_layers = {u: [f"l{i}"] for u in units}
        slots.append(
            Slot(
                id=f"l{i}",
                layers=[f"l{i}"],
                op="MatMul",
                methods=methods,
                spaces=spaces,
                units=units,
                unit_layers=unit_layers,
                stats=stats,
            )
        )
    return SearchSpace(slots)


def toy_score(space: SearchSpace, x: np.ndarray) -> dict[str, float]:
    """Accuracy drop and bytes of the decoded policy; ``reward`` scalarizes them."""
    drop = size = full = 0.0
    for slot, d in zip(space.slots, space.decode(x).decisions, strict=True):
        p, s, o = slot.stats["params"], slot.stats["sensitivity"], d.options
        full += 4 * p
        if d.method == "none":
            size += 4 * p
        elif d.method == "prune-magnitude":
            size += 4 * p * (1 - o["sparsity"])
            drop += s * o["sparsity"] ** 3
        elif d.method == "quantize-weights":
            size += p * o["bits"] / 8 * (1 + 4 / o["group_size"])
            drop += s * (0.02 if o["bits"] == 4 else 0.3)
        elif d.method == "quantize-dynamic":
            size += p
            drop += s * 0.01
        elif d.method == "factorize-lowrank":
            kept = min(1.0, o["rank"] * 2 / 64)
            size += 4 * p * kept
            drop += s * (1 - kept) ** 2
        elif d.method == "remove":
            drop += 2 * s
    return {"accuracy_drop": drop, "size_bytes": size, "reward": -(drop + 0.5 * size / full)}


def run(strategy, space: SearchSpace, batches: int, n: int) -> list[list[dict[str, float]]]:
    out = []
    for _ in range(batches):
        xs = strategy.ask(n)
        scores = [toy_score(space, x) for x in xs]
        strategy.tell(xs, scores)
        out.append(scores)
    return out


def rewards(batch: list[dict[str, float]]) -> np.ndarray:
    return np.array([s["reward"] for s in batch])


# -- ppo ------------------------------------------------------------------------------------
def test_ppo_improves_on_its_first_generation() -> None:
    space = toy_space()
    hist = run(PPOStrategy(space, OBJECTIVES, seed=0), space, batches=15, n=16)
    first, last = rewards(hist[0]), rewards(hist[-1])
    assert last.mean() > first.mean() + 0.4  # measured: about -0.95 -> -0.11
    assert last.max() > first.max()


def test_ppo_writes_genes_decode_reads_back() -> None:
    """Emitted genes sit at bin centres: actions -> vector -> actions is the identity, and every
    vector decodes to a policy whose methods its slots allow."""
    space = toy_space()
    agent = PPOStrategy(space, OBJECTIVES, seed=1)
    xs = agent.ask(32)
    m_act, p_act = agent._to_actions(xs)
    again = agent._to_vectors(m_act, p_act)
    np.testing.assert_array_equal(np.stack(xs), np.stack(again))
    methods = set()
    for x in xs:
        assert x.shape == (space.dim,) and np.all((x > 0) & (x < 1))
        for slot, d in zip(space.slots, space.decode(x).decisions, strict=True):
            assert d.method in [m.name for m in slot.methods]
            methods.add(d.method)
    assert {"none", "prune-magnitude", "quantize-weights", "remove"} <= methods  # explores


def test_ppo_resume_continues_identically() -> None:
    space = toy_space()
    a = PPOStrategy(space, OBJECTIVES, seed=3)
    run(a, space, batches=3, n=8)
    state = json.loads(json.dumps(a.state_dict()))  # what the policy database stores
    b = PPOStrategy(space, OBJECTIVES, seed=99)
    b.load_state_dict(state)
    for _ in range(2):
        xa, xb = a.ask(8), b.ask(8)
        np.testing.assert_array_equal(np.stack(xa), np.stack(xb))
        a.tell(xa, [toy_score(space, x) for x in xa])
        b.tell(xb, [toy_score(space, x) for x in xb])
    with pytest.raises(GraphSurgeonError, match="different search space"):
        PPOStrategy(toy_space(5), OBJECTIVES).load_state_dict(state)


def test_ppo_survives_failures_and_foreign_vectors() -> None:
    space = toy_space()
    agent = PPOStrategy(space, OBJECTIVES, seed=0, initial=[space.identity()])
    xs = agent.ask(6)
    np.testing.assert_array_equal(xs[0], space.identity())  # the seed comes first
    scores = [toy_score(space, x) for x in xs]
    scores[1] = None  # this policy failed to apply
    foreign = np.random.default_rng(0).random(space.dim)  # e.g. from another strategy
    agent.tell([*xs, foreign], [*scores, toy_score(space, foreign)])
    assert agent.told == 7 and len(agent.ask(4)) == 4


# -- bo -------------------------------------------------------------------------------------
def test_bo_improves_on_its_first_batch() -> None:
    space = toy_space()
    hist = run(BOStrategy(space, ["reward"], seed=0), space, batches=8, n=10)
    first, last = rewards(hist[0]), np.concatenate([rewards(b) for b in hist[-2:]])
    # TPE keeps exploring (a few draws stay poor), so compare medians; measured -0.46 -> -0.27
    assert np.median(last) > np.median(first) + 0.1
    assert last.max() > first.max()


def test_bo_multiobjective_front_improves() -> None:
    space = toy_space()
    hist = run(BOStrategy(space, OBJECTIVES, seed=0), space, batches=6, n=10)
    full = 4 * sum(s.stats["params"] for s in space.slots)

    def hv(batch: list[dict[str, float]]) -> float:
        f = np.array([[s["accuracy_drop"], s["size_bytes"] / full] for s in batch])
        return hypervolume(f, np.array([2.0, 1.0]))

    assert hv(hist[-1] + hist[-2]) > hv(hist[0])


def test_bo_uses_typed_conditional_parameters() -> None:
    space = toy_space(3)
    agent = BOStrategy(space, OBJECTIVES, seed=0)
    xs = agent.ask(12)
    trial = agent.study.trials[0]
    method = trial.params["l0|method"]
    assert method in {
        "none",
        "prune-magnitude",
        "quantize-weights",
        "quantize-dynamic",
        "factorize-lowrank",
    }
    # only the chosen method's parameters exist, with the pass's own types
    own = {k for k in trial.params if k.startswith(f"l0|{method}.")}
    assert all(
        k.startswith(("l0|method", f"l0|{method}.")) for k in trial.params if k.startswith("l0|")
    )
    if method == "quantize-weights":
        assert trial.params["l0|quantize-weights.bits"] in (4, 2) and len(own) == 2
    # the vector decodes back to exactly the trial's choices
    d = space.decode(xs[0]).decisions[0]
    assert d.method == method
    decoded = {f"l0|{method}.{k}": v for k, v in d.options.items()}
    assert decoded == pytest.approx({k: trial.params[k] for k in own}, rel=1e-3)  # 4 digits


def test_bo_resume_rebuilds_the_study() -> None:
    space = toy_space()
    a = BOStrategy(space, OBJECTIVES, seed=0)
    run(a, space, batches=2, n=8)
    xs = a.ask(4)
    a.tell(xs, [None, *[toy_score(space, x) for x in xs[1:]]])  # one failed
    foreign = np.random.default_rng(1).random(space.dim)
    a.tell([foreign], [toy_score(space, foreign)])  # not asked: added as a finished trial
    state = json.loads(json.dumps(a.state_dict()))
    b = BOStrategy(space, OBJECTIVES, seed=0)
    b.load_state_dict(state)

    def done(s: BOStrategy) -> list[tuple[float, ...]]:
        return sorted(tuple(t.values) for t in s.study.trials if t.values is not None)

    assert len(done(b)) == len(done(a)) == 20
    np.testing.assert_allclose(done(b), done(a))
    run(b, space, batches=1, n=4)  # and it goes on
    assert b.told == 25


# -- --tune-search ---------------------------------------------------------------------------
def test_tune_search_picks_hyperparameters_from_the_declaration() -> None:
    space = toy_space(4)
    seen = []

    def inner(strategy, knobs) -> float:  # a short inner search; its best reward is the objective
        assert knobs == {}
        seen.append(strategy.lam)
        hist = run(strategy, space, batches=3, n=6)
        return float(max(rewards(b).max() for b in hist))

    out = tune_search("ppo", space, inner, 3, objectives=OBJECTIVES, tune=["lam", "lr"])
    assert len(out["trials"]) == 3 and len(set(seen)) == 3
    lam = PPOStrategy.hyperparameters["lam"]
    assert lam.low <= out["best"]["lam"] <= lam.high
    assert out["value"] == max(t["value"] for t in out["trials"])
    with pytest.raises(GraphSurgeonError, match="no hyperparameter mutation"):
        tune_search("ppo", space, inner, 2, objectives=OBJECTIVES, tune=["mutation"])


def test_registry_finds_both_and_bad_options_are_one_line_errors() -> None:
    assert get_strategy("ppo") is PPOStrategy and get_strategy("bo") is BOStrategy
    with pytest.raises(GraphSurgeonError, match="unknown option"):
        PPOStrategy(toy_space(2), OBJECTIVES, learning_rate=1.0)
    with pytest.raises(GraphSurgeonError, match="option lr: expected float, got 'fast'"):
        PPOStrategy(toy_space(2), OBJECTIVES, lr="fast")
    with pytest.raises(GraphSurgeonError, match=r"option clip: 2.0 is not \[0.001, 1.0\]"):
        PPOStrategy(toy_space(2), OBJECTIVES, clip=2)
    with pytest.raises(GraphSurgeonError, match="option sampler: tpe or nsga2, not 'cmaes'"):
        BOStrategy(toy_space(2), OBJECTIVES, sampler="cmaes")
    with pytest.raises(GraphSurgeonError, match="n_startup_trials: expected a positive integer"):
        BOStrategy(toy_space(2), OBJECTIVES, n_startup_trials=2.5)


# -- ray ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_executor_on_a_local_head(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    from graphsurgeon.search.executors import SerialExecutor
    from graphsurgeon.search.ray_executor import RayExecutor

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    # defined here, so it travels by value: workers need not import this (torch-heavy) module
    class _Square:
        """Counts its calls on itself (state a worker keeps between items); fails on item 3."""

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, x: int) -> tuple[int, int]:
            self.calls += 1
            if x == 3:
                raise ValueError("item 3 is broken")
            return x * x, self.calls

    try:
        executor = RayExecutor(2, max_retries=0)
    except GraphSurgeonError as e:  # e.g. a sandbox that forbids the head's sockets
        pytest.skip(f"a local Ray head cannot start here: {e}")
    try:
        fn = _Square()
        for _ in range(2):  # the same function twice: shipped and loaded once per worker
            got = dict(executor.map_unordered(fn, range(10)))
            want = dict(SerialExecutor().map_unordered(fn, range(10)))
            assert sorted(got) == list(range(10))
            assert isinstance(got[3], ValueError) and "item 3 is broken" in str(got[3])
            assert isinstance(want[3], ValueError)
            assert {k: v[0] for k, v in got.items() if k != 3} == {
                k: v[0] for k, v in want.items() if k != 3
            }
        # deserialized once per worker, not per item: a worker's calls accumulate across items
        # and maps (20 calls on 2 workers: one made >= 10, its last success returned >= 9)
        assert max(v[1] for k, v in got.items() if k != 3) >= 9
        # the caller may stop early: the rest is cancelled, and the next map still works
        for _ in executor.map_unordered(fn, range(100)):
            break

        def crash_on_zero(x: int) -> int:
            if x == 0:
                os._exit(3)  # a segfaulting kernel, an OOM kill: the worker process dies
            return abs(x)

        got = dict(executor.map_unordered(crash_on_zero, [-1, 0, -2]))
        assert got[0] == 1 and got[2] == 2
        assert isinstance(got[1], ray.exceptions.WorkerCrashedError)
    finally:
        executor.close()


# -- end to end ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ppo", "bo"])
def test_tune_on_the_digits_cnn_resumes(strategy: str, digits, tmp_path) -> None:
    """`graphsurgeon tune --strategy ppo|bo`: real evaluations, the agent's state saved in the
    policy database after each batch and restored by --resume."""
    from graphsurgeon.cli import main
    from graphsurgeon.search.db import PolicyDB

    out = tmp_path / strategy
    args = [
        "tune", str(digits["model"]), "--profile", "x86-avx512-vnni",
        "--calib", str(digits["train"]), "--eval", str(digits["test"]),
        "--methods", "prune-magnitude,share-weights", "--measure-front", "1",
        "--strategy", strategy, "--strategy-option", "n_startup_trials=2" if strategy == "bo"
        else "episodes=3", "-o", str(out), "-q",
    ]  # fmt: skip
    assert main([*args, "--budget", "6"]) == 0
    db = PolicyDB(f"sqlite:///{out / 'search.db'}")
    state = db.study(strategy).strategy_state
    assert state["told"] == 6
    db.close()
    assert main([*args, "--budget", "9", "--resume"]) == 0
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["evaluations"] == 9 and pareto["front"]
    assert (out / "best.onnx").exists()


def test_tune_search_draws_search_knobs_beside_the_strategy() -> None:
    space = toy_space(4)
    seen = []

    def inner(strategy, knobs) -> float:  # the best lambda is the one nearest 2
        seen.append(knobs["lambda"])
        return -abs(np.log(knobs["lambda"] / 2.0))

    out = tune_search(
        "ppo", space, inner, 6, objectives=OBJECTIVES, tune=["lr"],
        extra={"lambda": FloatRange(0.05, 20.0, log=True)},
    )  # fmt: skip
    assert len(set(seen)) == 6 and all(0.05 <= x <= 20.0 for x in seen)
    assert out["best"]["lambda"] == min(seen, key=lambda x: abs(np.log(x / 2.0)))
    assert all("lambda" in t["knobs"] for t in out["trials"])


def test_which_strategies_steer_by_the_reward() -> None:
    space = toy_space(4)
    assert get_strategy("ppo")(space, OBJECTIVES).reads_reward
    assert not get_strategy("ppo")(space, OBJECTIVES, lam=0.5).reads_reward  # its own lam
    assert get_strategy("bo")(space, OBJECTIVES, scalarize=True).reads_reward
    assert not get_strategy("bo")(space, OBJECTIVES).reads_reward
    assert not get_strategy("ga")(space, OBJECTIVES).reads_reward
    assert not get_strategy("random")(space, OBJECTIVES).reads_reward
