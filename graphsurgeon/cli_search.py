"""`tune` and `policies`: compression search and the policy database."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.options import FloatRange


def _storage_url(text: str | None, default_dir: str | None = None) -> str:
    """A SQLAlchemy URL, a ``.db`` file, or a tune output folder (its ``search.db``)."""

    if text and "://" in text:
        return text
    path = Path(text or default_dir or ".")
    if path.is_dir():
        path = path / "search.db"
    if not path.is_file():
        raise GraphSurgeonError(
            "no policy database here (give --storage URL or a tune folder)", where=path
        )
    return f"sqlite:///{path.resolve()}"


def cmd_tune(args: argparse.Namespace) -> int:
    from graphsurgeon.search.tune import parse_budget, tune
    from graphsurgeon.shapes import parse_shape_args

    for path in (args.model, args.calib, args.eval):
        if path is not None and not Path(path).is_file():
            raise GraphSurgeonError("no such file", where=path)
    parse_budget(args.budget)  # fail before any work
    args.prelude = _prelude(args.prelude)
    if args.workers < 1:
        raise GraphSurgeonError(f"--workers: at least 1, not {args.workers}")
    options: dict[str, Any] = {}
    for item in args.strategy_option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise GraphSurgeonError(f"--strategy-option: expected KEY=VALUE, got {item!r}")
        import yaml

        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    search_lam = None
    if args.tune_search:
        best, search_lam = _tune_search(args, options)
        options.update(best)
    result = tune(
        args.model,
        profile=args.profile,
        out_dir=args.output,
        calib=args.calib,
        eval_data=args.eval,
        metric=args.metric,
        strategy=args.strategy,
        budget=args.budget,
        objectives=args.objectives,
        storage=args.storage,
        resume=args.resume,
        study=args.study,
        workers=args.workers,
        executor=args.executor,
        ray_address=args.ray_address,
        max_accuracy_drop=args.max_accuracy_drop,
        max_latency=args.max_latency,
        max_size=args.max_size,
        lam=args.lam,
        search_lam=search_lam,
        seed=args.seed,
        methods=args.methods,
        prelude=args.prelude,
        shapes=parse_shape_args(args.shape),
        noise=args.noise,
        robustness=args.robustness,
        measure_front=args.measure_front,
        strategy_options=options,
        progress=not args.quiet,
    )
    _print_result(result)
    return 0


def _prelude(text: str) -> list[str]:
    """``--prelude a,b,c``: pass or pipeline names, each checked before any work."""
    from graphsurgeon.pipeline import compile_pipeline

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise GraphSurgeonError("--prelude: give at least one pass or pipeline name")
    for name in names:
        try:
            compile_pipeline(name, source="--prelude")
        except GraphSurgeonError as e:
            raise GraphSurgeonError(f"--prelude: {e.problem}") from None
    return names


#: The reward's lambda as ``--tune-search`` draws it (log-uniform around the default 1).
LAMBDA_RANGE = FloatRange(0.05, 20.0, log=True)


def _tune_search(
    args: argparse.Namespace, options: dict[str, Any]
) -> tuple[dict[str, Any], float | None]:
    """``--tune-search N``: N short searches (``--tune-search-evals`` policies each) with the
    strategy's hyperparameters drawn by an outer TPE study (``bo.tune_search``), scored by the
    hypervolume of their fronts; the best hyperparameters then run the real search. Options
    given with ``--strategy-option`` stay fixed.

    The reward's lambda is drawn too when the strategy steers by the reward (``ppo``, a
    scalarized ``bo``): the best one becomes the search's lambda (what the strategy learns
    from), while ``--lambda`` still makes the final pick from the front. NSGA-II and random
    search never read the reward, so for them lambda is not a search knob and is not tuned.
    Returns the best strategy options and the search's lambda (None: not tuned)."""
    from graphsurgeon.search.evaluate import EvalConfig, evaluator_for
    from graphsurgeon.search.space import SearchSpace
    from graphsurgeon.search.strategies import get_strategy
    from graphsurgeon.search.strategies.bo import tune_search
    from graphsurgeon.search.tune import tune
    from graphsurgeon.shapes import parse_shape_args

    shapes = parse_shape_args(args.shape)
    config = EvalConfig(
        model=str(Path(args.model).resolve()),
        profile=str(args.profile),
        calib=str(Path(args.calib).resolve()) if args.calib else None,
        eval=str(Path(args.eval).resolve()) if args.eval else None,
        metric=args.metric,
        shapes=shapes,
        prelude=tuple(args.prelude),
    )
    evaluator = evaluator_for(config)
    space = SearchSpace.build(
        evaluator.base_model(), methods=args.methods, prelude=config.prelude, calib=evaluator.calib
    )
    work = Path(args.output) / "tune-search"
    url = args.storage or f"sqlite:///{work.resolve() / 'search.db'}"
    trials: list[float] = []
    keys = list(evaluator_objectives(args.objectives))
    cls = get_strategy(args.strategy)
    probe = cls(space, keys, seed=args.seed, **options)
    extra = {"lambda": LAMBDA_RANGE} if probe.reads_reward else {}
    # ppo's own ``lam`` would make it scalarize by itself and ignore the tuned reward
    names = [k for k in cls.hyperparameters if not (extra and k == "lam")]
    if not extra:
        print(
            f"tune-search: lambda is not tuned: {args.strategy} does not steer by the reward "
            "(--lambda only picks from the front)",
            flush=True,
        )

    def objective(strategy: Any, knobs: dict[str, Any]) -> float:
        result = tune(
            args.model,
            profile=args.profile,
            out_dir=work,
            calib=args.calib,
            eval_data=args.eval,
            metric=args.metric,
            strategy=args.strategy,
            budget=args.tune_search_evals,
            objectives=args.objectives,
            storage=url,
            study=f"tune-search-{len(trials)}-seed{args.seed}",
            max_accuracy_drop=args.max_accuracy_drop,
            lam=args.lam,
            search_lam=knobs.get("lambda"),
            seed=args.seed + len(trials),
            methods=args.methods,
            prelude=args.prelude,
            shapes=shapes,
            measure_front=0,
            strategy_options={**options, **strategy.hyper},
            progress=False,
            write_outputs=False,
        )
        trials.append(result.hypervolume)
        drawn = {**strategy.hyper, **knobs}
        print(f"tune-search trial {len(trials)}: {drawn} -> hypervolume "
              f"{result.hypervolume:.4g}", flush=True)  # fmt: skip
        return result.hypervolume

    found = tune_search(
        args.strategy,
        space,
        objective,
        args.tune_search,
        objectives=keys,
        seed=args.seed,
        fixed=options,
        tune=names,
        extra=extra,
    )
    best = {k: v for k, v in found["best"].items() if k not in options}
    print(f"tune-search: best {best} (hypervolume {found['value']:.4g})", flush=True)
    search_lam = best.pop("lambda", None)
    return best, search_lam


def evaluator_objectives(objectives: str) -> list[str]:
    from graphsurgeon.search.evaluate import objective_keys

    keys = objective_keys(objectives)
    return keys if "accuracy_drop" in keys else ["accuracy_drop", *keys]


def _print_result(result: Any) -> None:
    from rich.table import Table

    from graphsurgeon.cli import _console

    con = _console()
    keys = [
        k
        for k in ("accuracy_drop", "latency_ms", "size_bytes", "energy_mj")
        if any(k in d["objectives"] for d in result.front + result.baselines)
    ]
    table = Table(title="measured Pareto front and baselines", title_justify="left")
    for col in ("", "id", *keys, "policy"):
        table.add_column(col)
    best_id = result.best["id"] if result.best else None
    for d in result.front:
        mark = "best" if d["id"] == best_id else "front"
        table.add_row(
            mark, str(d["id"]), *(_fmt(d["objectives"].get(k)) for k in keys), d["policy"][:80]
        )
    for d in result.baselines:
        table.add_row(d["name"], str(d["id"]), *(_fmt(d["objectives"].get(k)) for k in keys), "")
    con.print(table)
    con.print(
        f"{result.evaluations} policies ({result.evaluated} evaluated, {result.failed} failed) in "
        f"{result.elapsed_s:.1f} s; hypervolume {result.hypervolume:.4g}; study {result.study!r} "
        f"in {result.storage}"
    )
    for note in result.notes:
        con.print(f"note: {note}")
    out = result.out_dir
    written = [
        p.name
        for p in (out / "pareto.json", out / "best.onnx", out / "policy.yaml", out / "report.html")
        if p.exists()
    ]
    con.print(f"wrote {', '.join(str(out / w) for w in written)}")


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


# -- policies ------------------------------------------------------------------------------
def _open(args: argparse.Namespace) -> Any:
    from graphsurgeon.search.db import PolicyDB

    return PolicyDB(_storage_url(args.storage))


def cmd_policies_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from graphsurgeon.cli import _console

    db = _open(args)
    studies = db.studies()
    if args.study:
        studies = [s for s in studies if s.name == args.study]
        if not studies:
            raise GraphSurgeonError(f"no study {args.study!r} in {db.url}")
    rows_out = []
    for study in studies:
        for row in db.rows(study):
            if args.pareto and not row.pareto:
                continue
            if args.status and row.status != args.status:
                continue
            values = row.values()
            rows_out.append(
                {
                    "id": row.id,
                    "study": study.name,
                    "stage": row.stage,
                    "status": row.status,
                    "pareto": row.pareto,
                    "accuracy_drop": values.get("accuracy_drop"),
                    "latency_ms": values.get("latency_ms"),
                    "latency_kind": row.kinds().get("latency_ms"),
                    "size_bytes": values.get("size_bytes"),
                    "policy": row.name or _summary(row.policy),
                    "error": row.error,
                }
            )
    if args.limit:
        rows_out = rows_out[-args.limit :]
    if args.json:
        print(json.dumps(rows_out, indent=2, default=str))
        return 0
    table = Table(title=f"policies in {db.url}", title_justify="left")
    for col in (
        "id",
        "study",
        "stage",
        "status",
        "pareto",
        "acc drop",
        "latency ms",
        "size",
        "policy",
    ):
        table.add_column(col)
    for r in rows_out:
        table.add_row(
            str(r["id"]), r["study"], r["stage"], r["status"], "*" if r["pareto"] else "",
            _fmt(r["accuracy_drop"]), _fmt(r["latency_ms"]) + (" m" if r["latency_kind"] == "measured" else ""),
            _fmt(r["size_bytes"]), (r["error"] or r["policy"])[:70],
        )  # fmt: skip
    _console().print(table)
    return 0


def _summary(policy: dict[str, Any]) -> str:
    from graphsurgeon.search.policy import Policy

    if "decisions" in policy:
        return Policy.from_dict(policy).summary()
    return str(policy.get("steps"))


def _row(db: Any, policy_id: int) -> Any:
    row = db.get(policy_id)
    if row is None:
        raise GraphSurgeonError(f"no policy with id {policy_id} in {db.url}")
    return row


def lineage(db: Any, row: Any, depth: int = 3) -> list[dict[str, Any]]:
    """The ancestors of ``row`` up to ``depth`` generations back, nearest first: each with
    how it was made (``crossover`` of two parents or ``mutation`` of one; ``sampled`` when the
    strategy bred it from no single policy), its generation, parents and objectives."""
    out: list[dict[str, Any]] = []
    seen = {row.id}
    frontier = list(row.parents or [])
    for level in range(1, depth + 1):
        nxt: list[int] = []
        for pid in frontier:
            if pid in seen:
                continue
            seen.add(pid)
            parent = db.get(pid)
            if parent is None:
                continue
            values = parent.values()
            out.append(
                {
                    "id": parent.id,
                    "up": level,
                    "made_by": _made_by(parent.parents),
                    "generation": parent.generation,
                    "parents": parent.parents,
                    "objectives": {k: values[k] for k in _OBJECTIVES if k in values},
                    "policy": _summary(parent.policy),
                }
            )
            nxt.extend(parent.parents or [])
        frontier = nxt
    return out


_OBJECTIVES = ("accuracy_drop", "latency_ms", "size_bytes", "energy_mj", "robustness_drop")


def _made_by(parents: list[int] | None) -> str:
    return {0: "sampled", 1: "mutation"}.get(len(parents or []), "crossover")


def cmd_policies_show(args: argparse.Namespace) -> int:
    db = _open(args)
    row = _row(db, args.id)
    data = {
        "id": row.id,
        "study": row.study.name,
        "stage": row.stage,
        "status": row.status,
        "pareto": row.pareto,
        "generation": row.generation,
        "made_by": _made_by(row.parents) if row.stage == "search" else row.stage,
        "parents": row.parents,
        "lineage": lineage(db, row, depth=args.depth),
        "cached": row.cached,
        "eval_s": row.eval_s,
        "error": row.error,
        "metrics": {m.name: {"value": m.value, "kind": m.kind} for m in row.metrics},
        "policy": row.policy,
    }
    print(json.dumps(data, indent=2, default=str))
    return 0


def _pipeline(row: Any) -> dict[str, Any]:
    from graphsurgeon.search.policy import Policy

    if "decisions" in row.policy:
        return Policy.from_dict(row.policy).to_pipeline()
    prelude = list(row.study.config.get("eval", {}).get("prelude") or [])
    return {"steps": prelude + list(row.policy["steps"])}


def cmd_policies_export(args: argparse.Namespace) -> int:
    import yaml

    from graphsurgeon.model_io import atomic_write

    db = _open(args)
    row = _row(db, args.id)
    if args.format == "policy":
        text = json.dumps(row.policy, indent=2)
    else:
        text = yaml.safe_dump(_pipeline(row), sort_keys=False)
    if args.output in (None, "-"):
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        with atomic_write(args.output) as f:
            f.write(text)
        print(f"wrote {args.output}")
    return 0


def cmd_policies_apply(args: argparse.Namespace) -> int:
    """Apply a stored policy to MODEL; to a different model, transfer it by role and shape."""
    from graphsurgeon.model_io import load, save
    from graphsurgeon.pipeline import run_pipeline
    from graphsurgeon.search.policy import Policy
    from graphsurgeon.search.space import SearchSpace
    from graphsurgeon.search.transfer import transfer
    from graphsurgeon.shapes import parse_shape_args

    db = _open(args)
    row = _row(db, args.id)
    shapes = parse_shape_args(args.shape)
    report = None
    same = Path(args.model).resolve() == Path(row.study.model_path).resolve()
    if "decisions" not in row.policy or (same and not args.transfer):
        spec = _pipeline(row)
    else:
        policy = Policy.from_dict(row.policy)
        target = load(args.model, shapes=shapes)
        prepared = target.clone() if hasattr(target, "clone") else load(args.model, shapes=shapes)
        run_pipeline(prepared, list(policy.prelude) or ["eliminate-dead-code"])
        space = SearchSpace.build(prepared, prelude=policy.prelude)
        moved, report = transfer(policy, space)
        spec = moved.to_pipeline()
    model = load(args.model, shapes=shapes)
    result = run_pipeline(model, spec, calib=args.calib, verify=args.verify)
    save(result.model, args.output)
    if report is not None:
        data = report.to_dict()
        print(f"transferred {len(data['mapped'])} decisions:")
        for m in data["mapped"]:
            print(f"  {m['target']} <- {m['source']}: {m['decision']} (match {m['score']})")
        for u in data["unmapped_source"]:
            print(f"  not mapped: {u['source']}: {u['decision']} ({u['reason']})")
        if data["unmatched_target"]:
            print(f"  left uncompressed: {', '.join(data['unmatched_target'])}")
        if args.report:
            Path(args.report).write_text(json.dumps(data, indent=2))
    print(f"wrote {args.output}")
    return 0


def add_commands(sub: argparse._SubParsersAction, add_shape: Callable) -> None:  # type: ignore[type-arg]
    """Register this module's subcommands."""
    p = sub.add_parser(
        "tune",
        help="search per-layer compression policies (Pareto front of accuracy, latency, size, energy)",
    )
    p.add_argument("model")
    p.add_argument("--profile", required=True, help="hardware profile: shipped name or YAML file")
    p.add_argument("--calib", help=".npz calibration inputs (also the eval set without --eval)")
    p.add_argument("--eval", help=".npz evaluation set (optional 'labels')")
    p.add_argument("--metric", help="module:function or fidelity|top1|accuracy|default")
    p.add_argument("--strategy", default="ga", help="ga (default), random, ppo or bo")
    p.add_argument(
        "--strategy-option", action="append", metavar="KEY=VALUE", help="e.g. pop_size=64"
    )
    p.add_argument("--budget", default="100", help="evaluations (200) or a duration (90s, 20m, 1h)")
    p.add_argument(
        "--objectives", default="accuracy,latency,size",
        help="comma list of accuracy, latency, size, energy, robustness (all minimized)",
    )  # fmt: skip
    p.add_argument(
        "--methods", help="restrict per-layer methods: names or families (prune,quantize)"
    )
    p.add_argument(
        "--prelude",
        default="cleanup",
        help="exact passes or pipelines applied before the search, comma-separated; every "
        "policy, baseline and replay starts from their output (default: cleanup; for BERT-like "
        "encoders on the CPU: cleanup,fuse-attention,unfuse-skip-layernorm)",
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--storage", help="SQLAlchemy URL of the policy DB (default: sqlite in -o)")
    p.add_argument("--study", help="study name (default: the output folder's name)")
    p.add_argument("--resume", action="store_true", help="continue the study after a crash or kill")
    p.add_argument("--workers", type=int, default=1, help="parallel evaluations")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--max-accuracy-drop", type=float, help="constraint on the metric's drop")
    p.add_argument("--max-latency", type=float, help="constraint, milliseconds")
    p.add_argument("--max-size", type=float, help="constraint, bytes")
    p.add_argument(
        "--lambda", dest="lam", type=float, default=1.0, help="cost weight in the reward"
    )
    p.add_argument("--noise", type=float, help="robustness: perturbation size x input std (0.1)")
    p.add_argument(
        "--robustness", default="auto", choices=["auto", "fgsm", "gaussian"],
        help="robustness perturbation: FGSM through the training bridge (auto: where it runs)",
    )  # fmt: skip
    p.add_argument(
        "--measure-front", type=int, default=8, help="front points measured on the device"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tune-search",
        type=int,
        default=0,
        metavar="N",
        help="first tune the strategy's own hyperparameters with N short searches (bo/TPE)",
    )
    p.add_argument(
        "--tune-search-evals", type=int, default=16, help="policies per short search (16)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_shape(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("policies", help="the policy database: list, show, apply, export")
    psub = p.add_subparsers(dest="policies_command", required=True)

    def storage(q: argparse.ArgumentParser) -> None:
        q.add_argument("--storage", help="SQLAlchemy URL, a .db file or a tune folder (default: .)")

    q = psub.add_parser("list", help="evaluated policies with their objectives")
    storage(q)
    q.add_argument("--study")
    q.add_argument("--pareto", action="store_true", help="only Pareto-optimal ones")
    q.add_argument("--status", choices=["ok", "failed", "infeasible"])
    q.add_argument("--limit", type=int, default=0, help="the last N (0: all)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_policies_list)

    q = psub.add_parser("show", help="one policy: decisions, metrics, lineage, error")
    storage(q)
    q.add_argument("id", type=int)
    q.add_argument(
        "--depth", type=int, default=3, help="generations of ancestors to list (3; 0: none)"
    )
    q.set_defaults(func=cmd_policies_show)

    q = psub.add_parser(
        "export", help="a policy as a pipeline YAML (`graphsurgeon run` replays it)"
    )
    storage(q)
    q.add_argument("id", type=int)
    q.add_argument("-o", "--output", help="file (default: stdout)")
    q.add_argument("--format", choices=["pipeline", "policy"], default="pipeline")
    q.set_defaults(func=cmd_policies_export)

    q = psub.add_parser(
        "apply",
        help="apply a policy to a model (another model: transferred by layer role and shape)",
    )
    storage(q)
    q.add_argument("id", type=int)
    q.add_argument("model")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--calib", help=".npz calibration inputs for the passes")
    q.add_argument(
        "--transfer", action="store_true", help="match layers even on the same model file"
    )
    q.add_argument("--report", help="write the transfer report (JSON) here")
    q.add_argument("--verify", default="structural", choices=["structural", "numeric", "off"])
    add_shape(q)
    q.set_defaults(func=cmd_policies_apply)
