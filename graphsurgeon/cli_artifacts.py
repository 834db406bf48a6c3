"""`compile`, `verify` and `optimize`: deployable bundles."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphsurgeon.errors import GraphSurgeonError, VerificationError


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_profile_or_detect(spec: str | None):
    """The named/filed profile, else this machine detected (quick microbenchmarks)."""
    from graphsurgeon.profiles import load_profile

    if spec:
        return load_profile(spec)
    from graphsurgeon.detect import detect_profile

    _log("no --profile: detecting this machine (quick)")
    return detect_profile(quick=True)


def file_sha256(path: Path) -> str:
    from graphsurgeon.bundle import sha256_file

    return sha256_file(path)


def _shapes(args: argparse.Namespace) -> dict[str, list[int]] | None:
    from graphsurgeon.shapes import parse_shape_args

    return parse_shape_args(args.shape) or None


def check_bundle_destination(out: Path) -> None:
    """Fail before any work if the bundle folder cannot be created at ``out``."""
    import os

    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise GraphSurgeonError("output's parent folder does not exist", where=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GraphSurgeonError("output's parent folder is not writable", where=parent)
    # permission bits do not stop root, and some file systems refuse anyway (/proc,
    # read-only mounts): try it, before any work is done
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=parent))
    except OSError as e:
        raise GraphSurgeonError(
            f"output's parent folder is not writable ({e.strerror or e})", where=parent
        ) from None
    if out.exists() and not out.is_dir():
        raise GraphSurgeonError("output exists and is a file, not a bundle folder", where=out)


def build_bundle(
    model,
    profile,
    out: Path,
    *,
    backend: str,
    calib,
    shapes: dict[str, list[int]] | None,
    tune_seconds: float,
    source: Path,
    policy: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    acceptance: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    log: Callable[[str], None] = _log,
):
    """Compile ``model`` for ``profile`` and write the bundle; returns the backend results."""
    from graphsurgeon.bundle import write_bundle
    from graphsurgeon.compiler import compile_model_bundle, static_feeds
    from graphsurgeon.report import render_report

    feeds = static_feeds(model, profile, calib, shapes)
    results, work = compile_model_bundle(
        model, profile, backend=backend, feeds=feeds, tune_seconds=tune_seconds, log=log
    )
    try:
        chosen = next(r for r in results if r.status == "chosen")
        fixed = {k: list(v.shape) for k, v in feeds[0].items()}
        all_metrics = {
            "latency_ms": chosen.latency_ms,
            "p90_ms": chosen.p90_ms,
            "cv": chosen.cv,
            "backends": [r.to_dict() for r in results],
            **({"shapes": fixed} if not chosen.backend.startswith("ort") else {}),
            **(metrics or {}),
        }
        data = dict(report or {})
        data.setdefault("title", f"graphsurgeon compile: {source.name}")
        data.setdefault("model", {"path": str(source)})
        data.setdefault("profile", profile.name)
        data.setdefault(
            "baselines",
            [
                {
                    "name": r.backend,
                    "latency_ms": r.latency_ms,
                    "note": f"{r.status}{': ' + r.detail if r.detail else ''}",
                }
                for r in results
            ],
        )
        write_bundle(
            out,
            model=model,
            backend=chosen.backend,
            profile=profile,
            policy=policy,
            metrics=all_metrics,
            acceptance=acceptance or {"min_cosine": 0.9999},
            source={"path": str(source), "sha256": file_sha256(source)},
            files=chosen.files,
            artifacts=chosen.artifacts,
            report_html=render_report(data),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _results_table(results) -> Any:
    from rich.table import Table

    table = Table(title="backends", show_lines=False)
    for col in ("backend", "status", "median", "p90", "cv", "cosine vs ORT", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.backend,
            r.status,
            "-" if r.latency_ms is None else f"{r.latency_ms:.3f} ms",
            "-" if r.p90_ms is None else f"{r.p90_ms:.3f} ms",
            "-" if r.cv is None else f"{r.cv:.3f}",
            "-" if r.cosine is None else f"{r.cosine:.6f}",
            r.detail,
        )
    return table


def cmd_compile(args: argparse.Namespace) -> int:
    from graphsurgeon.data import load_npz
    from graphsurgeon.model_io import load

    source = Path(args.model)
    profile = load_profile_or_detect(args.profile)
    model = load(source, shapes=_shapes(args))
    calib = load_npz(args.calib, model) if args.calib else None
    out = Path(args.output)
    check_bundle_destination(out)
    policy = None
    if args.policy:
        import yaml

        policy = yaml.safe_load(Path(args.policy).read_text())
    results = build_bundle(
        model,
        profile,
        out,
        backend=args.backend,
        calib=calib,
        shapes=_shapes(args),
        tune_seconds=args.tune_minutes * 60,
        source=source,
        policy=policy,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        con = _console()
        con.print(_results_table(results))
        chosen = next(r for r in results if r.status == "chosen")
        con.print(f"wrote {out}/ (backend {chosen.backend}, {chosen.latency_ms:.3f} ms median)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from graphsurgeon.bundle_verify import verify_bundle

    result = verify_bundle(
        args.bundle,
        args.reference,
        data=args.data,
        max_samples=args.max_samples,
        min_cosine=args.min_cosine,
        backend=args.backend,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        from rich.table import Table

        table = Table(title=f"verify {args.bundle} ({result.backend}, {result.samples} samples)")
        for col in ("check", "result", "detail"):
            table.add_column(col)
        for c in result.checks:
            table.add_row(c.name, "ok" if c.ok else "FAILED", c.detail)
        _console().print(table)
    if not result.ok:
        failed = next(c for c in result.checks if not c.ok)
        raise VerificationError(f"{failed.name}: {failed.detail}", where=args.bundle)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from graphsurgeon.optimize import OptimizeConfig, optimize, work_folder

    config = OptimizeConfig(
        model=Path(args.model),
        output=Path(args.output),
        profile=args.profile,
        calib=Path(args.calib) if args.calib else None,
        eval=Path(args.eval) if args.eval else None,
        metric=args.metric,
        max_accuracy_drop=args.max_accuracy_drop,
        budget=args.budget,
        strategy=args.strategy,
        workers=args.workers,
        seed=args.seed,
        shapes=_shapes(args),
        fresh=args.fresh,
    )
    for path in (config.model, config.calib, config.eval):
        if path is not None and not path.is_file():
            raise GraphSurgeonError("no such file", where=path)
    try:
        result = optimize(config, log=_log)
    except KeyboardInterrupt:
        print(
            f"graphsurgeon: interrupted; progress is kept in {work_folder(config)}: run the same "
            "command again to resume (nothing was written to the output)",
            file=sys.stderr,
        )
        return 130
    from rich.table import Table

    o, f = result.original, result.final
    table = Table(title=f"optimize {config.model.name} -> {result.bundle}/ ({result.backend})")
    for col in ("", "original", "bundle", "change"):
        table.add_column(col)
    table.add_row(
        o["metric"], f"{o['score']:.4f}", f"{f['score']:.4f}", f"{f['score'] - o['score']:+.4f}"
    )
    table.add_row(
        "latency (ORT, side by side)",
        f"{o['latency_ms']:.4f} ms",
        f"{f['latency_ms']:.4f} ms",
        f"{o['latency_ms'] / f['latency_ms']:.2f}x faster",
    )
    table.add_row(
        "size",
        f"{o['size_bytes']:,} B",
        f"{f['size_bytes']:,} B",
        f"{o['size_bytes'] / max(1, f['size_bytes']):.2f}x smaller",
    )
    if o.get("energy") and f.get("energy"):
        table.add_row(
            "energy / inference",
            f"{o['energy']['mj']:.4g} mJ",
            f"{f['energy']['mj']:.4g} mJ ({f['energy']['kind']})",
            f"{o['energy']['mj'] / max(f['energy']['mj'], 1e-12):.2f}x less",
        )
    con = _console()
    con.print(table)
    con.print(f"policy: {result.policy}")
    for note in result.notes:
        con.print(f"note: {note}")
    files = ", ".join(
        p.name + ("/" if p.is_dir() else "") for p in sorted(Path(result.bundle).iterdir())
    )
    con.print(f"wrote {result.bundle}/ ({files})")
    return 0


def add_commands(sub: argparse._SubParsersAction, add_shape: Callable) -> None:  # type: ignore[type-arg]
    """Register this module's subcommands."""
    p = sub.add_parser("compile", help="pick the fastest correct backend and write a bundle")
    p.add_argument("model")
    p.add_argument("--profile", help="shipped profile name or YAML (default: detect this machine)")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "tvm", "triton"])
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE/")
    p.add_argument("--calib", help=".npz inputs to check and time with (default: generated)")
    p.add_argument("--tune-minutes", type=float, default=0.0, help="TVM tuning budget (0)")
    p.add_argument("--policy", help="the policy YAML that produced the model (recorded)")
    p.add_argument("--json", action="store_true")
    add_shape(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("verify", help="check a bundle's files and outputs against a model")
    p.add_argument("bundle", metavar="BUNDLE/")
    p.add_argument("--reference", required=True, metavar="MODEL", help="the source model")
    p.add_argument("--data", help=".npz inputs (optional labels); default: generated inputs")
    p.add_argument("--max-samples", type=int, default=256)
    p.add_argument("--min-cosine", type=float, help="override the bundle's acceptance cosine")
    p.add_argument("--backend", help="run with this backend instead of the manifest's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("optimize", help="cleanup, search, recover, compile, verify: a bundle")
    p.add_argument("model")
    p.add_argument("--profile", help="shipped profile name or YAML (default: detect this machine)")
    p.add_argument("--calib", help=".npz calibration/training inputs (default: generated)")
    p.add_argument("--eval", help=".npz evaluation inputs, labels optional (default: --calib)")
    p.add_argument("--metric", help="module:function or fidelity|top1|accuracy|default")
    p.add_argument("--max-accuracy-drop", type=float, default=0.01, help="(0.01)")
    p.add_argument("--budget", default="5m", help="total time: seconds or 5m, 1h30m (5m)")
    p.add_argument("--strategy", default="ga", choices=["ga", "ppo", "bo", "random"])
    p.add_argument("--workers", type=int, default=1, help="local evaluation processes (1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore progress saved by a past run")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE/")
    add_shape(p)
    p.set_defaults(func=cmd_optimize)
