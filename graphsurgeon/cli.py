"""The ``graphsurgeon`` command line.

Every user error exits with code 2 and one line ``graphsurgeon: error: <file>: <problem>``;
a failed verification exits with 3. Outputs are written atomically, so a failed run leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from graphsurgeon.errors import GraphSurgeonError


def _human(n: float | int | None, unit: str = "") -> str:
    if n is None:
        return "?"
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{suffix}{unit}" if suffix else f"{n:g}{unit}"
        n /= 1000
    return f"{n:.4g}P{unit}"


def _console():
    from rich.console import Console

    # Piped output (CI logs, files) gets a fixed width instead of rich's 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


def _add_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shape",
        action="append",
        metavar="NAME=DIMS",
        default=[],
        help="give an input fixed dims, e.g. input=1x3x224x224 (repeatable)",
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    from graphsurgeon.inspect_model import inspect_model
    from graphsurgeon.model_io import load
    from graphsurgeon.shapes import parse_shape_args

    model = load(args.model, shapes=parse_shape_args(args.shape))
    info = inspect_model(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.markup import escape
    from rich.table import Table

    con = _console()
    con.print(
        f"[bold]{escape(str(args.model))}[/]  IR {info['ir_version']}  opsets {info['opsets']}  {info['producer']}"
    )
    io = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "dtype", "shape", "dynamic dims"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            # Shapes like "[batch, 3, 224, 224]" would otherwise be read as rich markup tags.
            io.add_row(
                kind[:-1],
                escape(v["name"]),
                v["dtype"] or "?",
                escape(v["shape"]),
                escape(", ".join(v["dynamic_dims"])) or "-",
            )
    con.print(io)
    ops = Table(title="ops", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(escape(op), str(n))
    con.print(ops)
    lt = Table(title="layers", title_justify="left")
    for col in ("id", "op", "weight", "output", "params", "MACs", "FLOPs", "bytes"):
        lt.add_column(
            col, justify="right" if col in ("params", "MACs", "FLOPs", "bytes") else "left"
        )
    for row in info["layers"]:
        lt.add_row(
            escape(row["id"]),
            row["op"],
            "x".join(map(str, row["weight_shape"])),
            "x".join(map(str, row["output_shape"])) if row["output_shape"] else "?",
            _human(row["params"]),
            _human(row["macs"]),
            _human(row["flops"]),
            _human(row["bytes"], "B"),
        )
    con.print(lt)
    t = info["totals"]
    con.print(
        f"[bold]totals[/]: {t['nodes']} nodes, {t['layers']} layers, {_human(t['params'])} params, "
        f"{_human(t['bytes'], 'B')} weights, {_human(t['macs'])} MACs, {_human(t['flops'])} FLOPs"
        + ("" if t["flops"] is not None else "  (FLOPs need static shapes: pass --shape)")
    )
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from graphsurgeon.options import describe_options
    from graphsurgeon.registry import all_passes

    rows = []
    for name, cls in all_passes().items():
        rows.append(
            {
                "name": name,
                "kind": cls.kind,
                "targets": cls.supports_targets,
                "doc": (cls.__doc__ or "").strip().split("\n")[0],
                "options": describe_options(cls.Options),
                "module": cls.__module__,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    from rich.table import Table

    table = Table(title="registered passes", title_justify="left", show_lines=True)
    for col in ("pass", "kind", "targets", "options (default; search space)", "what it does"):
        table.add_column(col)
    for r in rows:
        opts = (
            "\n".join(
                f"{o['name']}: {o['type']} = {o['default']!r}"
                + (f"; {_space_text(o['search_space'])}" if o["search_space"] else "")
                for o in r["options"]
            )
            or "-"
        )
        table.add_row(r["name"], r["kind"], "yes" if r["targets"] else "no", opts, r["doc"])
    _console().print(table)
    return 0


def _space_text(space: dict[str, Any]) -> str:
    if space["kind"] == "choice":
        return "one of " + ", ".join(map(str, space["values"]))
    log = " log" if space.get("log") else ""
    return f"{space['kind']} in [{space['low']}, {space['high']}]{log}"


def cmd_run(args: argparse.Namespace) -> int:
    from graphsurgeon.instruments import IRDump, PassRecord, default_instruments
    from graphsurgeon.model_io import atomic_write, load, save
    from graphsurgeon.pipeline import compile_pipeline, run_pipeline
    from graphsurgeon.shapes import parse_shape_args

    out = Path(args.output)
    _check_writable(out, "output")
    if args.report:
        _check_writable(Path(args.report), "report")
    steps = compile_pipeline(args.pipeline)  # validate the pipeline before loading the model
    model = load(args.model, shapes=parse_shape_args(args.shape))
    instruments = default_instruments()
    if args.dump_ir:
        try:
            instruments.insert(0, IRDump(args.dump_ir))
        except OSError as e:
            raise GraphSurgeonError(
                f"cannot create the IR dump folder: {e.strerror}", where=args.dump_ir
            ) from None
    con = _console()
    from rich.table import Table

    table = Table(title=f"{args.pipeline} on {args.model}", title_justify="left")
    for col in ("step", "pass", "kind", "changed", "time", "nodes", "params", "weights", "drift"):
        table.add_column(col, justify="right" if col in ("time",) else "left")

    def arrow(b: Any, a: Any, fmt=_human) -> str:
        return fmt(b) if b == a else f"{fmt(b)} -> {fmt(a)}"

    def add_row(r: PassRecord) -> None:
        b, a = r.before, r.after
        drift = "-"
        if r.drift:
            drift = "; ".join(f"{k}: cos {v['cosine']:.4f}" for k, v in list(r.drift.items())[:2])
        elif r.verified == "numeric":
            drift = "none (outputs match)"
        table.add_row(
            r.step.split(" ")[0],
            r.name,
            r.kind,
            "yes" if r.modified else "no",
            f"{r.time_s * 1000:.1f} ms",
            arrow(b.nodes, a.nodes, str) if b and a else "?",
            arrow(b.params, a.params) if b and a else "?",
            arrow(b.bytes, a.bytes, lambda n: _human(n, "B")) if b and a else "?",
            drift,
        )

    with (
        con.status("running passes...", spinner="dots")
        if sys.stderr.isatty()
        else contextlib.nullcontext()
    ):
        try:
            result = run_pipeline(
                model,
                steps,
                calib=args.calib,
                verify=args.verify,
                instruments=instruments,
                on_record=add_row,
            )
        except GraphSurgeonError as e:
            if e.where is None:  # about the model as a whole (onnxruntime cannot run it...)
                raise type(e)(e.problem, where=args.model) from None
            raise
    con.print(table)
    written = save(result.model, out)
    total_time = sum(r.time_s for r in result.records)
    if result.records and result.records[0].before and result.records[-1].after:
        b, a = result.records[0].before, result.records[-1].after
        con.print(
            f"nodes {b.nodes} -> {a.nodes}, weights {_human(b.bytes, 'B')} -> {_human(a.bytes, 'B')}, "
            f"passes took {total_time:.2f} s; verify={args.verify}"
        )
    from graphsurgeon.plasticity import summarize

    conn = summarize(result.records)
    if conn["created"] or conn["pruned"]:
        ratio = "n/a" if conn["plasticity"] is None else f"{conn['plasticity']:.4g}"
        con.print(
            f"connections: {_human(conn['pruned'])} pruned, {_human(conn['created'])} created; "
            f"plasticity {ratio}"
        )
    if result.drift_vs_original:
        con.print(f"drift vs original: {json.dumps(result.drift_vs_original)}")
    con.print(f"wrote {', '.join(map(str, written))}")
    if args.report:
        report = {
            "model": os.fspath(args.model),
            "output": os.fspath(out),
            "pipeline": os.fspath(args.pipeline),
            "verify": args.verify,
            **result.to_dict(),
            "plasticity": conn,
        }
        try:
            with atomic_write(args.report) as f:
                json.dump(report, f, indent=2, default=str)
        except BaseException:  # all or nothing: no model without its report
            for path in written:
                path.unlink(missing_ok=True)
            raise
        con.print(f"wrote {args.report}")
    return 0


def _check_writable(path: Path, what: str) -> None:
    """Fail before any work is done if ``path`` cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise GraphSurgeonError(f"{what} folder does not exist", where=folder)
    if path.is_dir():
        raise GraphSurgeonError(f"{what} path is a folder, not a file", where=path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GraphSurgeonError(f"{what} folder is not writable", where=folder)


def _parse_mapping(text: str | None, what: str) -> dict[str, Any]:
    """A JSON or YAML mapping given on the command line."""
    if not text:
        return {}
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GraphSurgeonError(f"{what}: not valid JSON or YAML ({_first_line(e)})") from None
    if not isinstance(value, dict):
        raise GraphSurgeonError(f"{what}: expected a mapping like {{energy: 0.9}}, got {text!r}")
    return value


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _parse_strengths(texts: list[str] | None) -> list[Any] | None:
    import yaml

    values: list[Any] = []
    for text in texts or []:
        for part in text.split(","):
            if part.strip():
                try:
                    values.append(yaml.safe_load(part.strip()))
                except yaml.YAMLError:
                    raise GraphSurgeonError(f"--strengths: bad value {part!r}") from None
    return values or None


def _number(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from graphsurgeon.metrics import load_metric
    from graphsurgeon.model_io import load
    from graphsurgeon.registry import get_pass
    from graphsurgeon.sensitivity import sensitivity_report
    from graphsurgeon.shapes import parse_shape_args

    options = _parse_mapping(args.options, "--options")
    get_pass(args.pass_name)(options)  # fail fast on bad input, before loading the model
    load_metric(args.metric)
    strengths = _parse_strengths(args.strengths)
    for path in (args.calib, args.eval):
        if path is not None and not Path(path).is_file():
            raise GraphSurgeonError("no such file", where=path)
    model = load(args.model, shapes=parse_shape_args(args.shape))
    report = sensitivity_report(
        model,
        args.pass_name,
        options=options,
        calib=args.calib,
        eval_data=args.eval or args.calib,
        metric=args.metric,
        option=args.option,
        strengths=strengths,
        units=args.layers or None,
        max_samples=args.max_samples,
    )
    report = {"model": os.fspath(args.model), **report}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    from rich.markup import escape
    from rich.table import Table

    head = report["metric"]
    title = f"sensitivity of {args.model} to {args.pass_name}"
    table = Table(title=title, title_justify="left")
    for col in ("layer", "op", report["option"] or "setting", head, "drift", "params", "status"):
        table.add_column(col, justify="right" if col in (head, "drift", "params") else "left")
    for row in report["rows"]:
        table.add_row(
            escape(row["layer"]),
            row["op"],
            _number(row["value"]) if report["option"] else "remove",
            _number(row["metrics"].get(head)),
            _number(row["drift"]),
            _human(row["params"]),
            escape(row["status"]),
        )
    con = _console()
    con.print(table)
    baseline = ", ".join(f"{k} {_number(v)}" for k, v in report["baseline"].items())
    con.print(f"original: {baseline}; {_human(report['params'])} params; drift = {head} lost")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from graphsurgeon.compare import compare_models
    from graphsurgeon.data import load_npz
    from graphsurgeon.model_io import load
    from graphsurgeon.shapes import parse_shape_args

    shapes = parse_shape_args(args.shape)
    a = load(args.model_a, shapes=shapes)
    b = load(args.model_b, shapes=shapes)
    calib = load_npz(args.calib, a)
    diffs = compare_models(a, b, calib, max_samples=args.max_samples)
    rows = [d.to_dict() for d in diffs]
    if args.json:
        print(
            json.dumps(
                {"a": os.fspath(args.model_a), "b": os.fspath(args.model_b), "tensors": rows},
                indent=2,
            )
        )
        return 0
    from rich.markup import escape
    from rich.table import Table

    shown = diffs[: args.top] if args.top else diffs
    table = Table(title=f"{args.model_b} vs {args.model_a}, worst first", title_justify="left")
    for col in ("tensor", "op", "matched by", "shape", "SQNR dB", "cosine", "max abs"):
        table.add_column(
            col, justify="right" if col in ("SQNR dB", "cosine", "max abs") else "left"
        )
    for d in shown:
        name = d.a if d.a == d.b else f"{d.a} ~ {d.b}"
        table.add_row(
            escape(name),
            d.op,
            d.matched_by,
            "x".join(map(str, d.shape)),
            f"{d.sqnr_db:.2f}",
            f"{d.cosine:.6f}",
            f"{d.max_abs:.3g}",
        )
    con = _console()
    con.print(table)
    same = sum(1 for d in diffs if d.sqnr_db == float("inf"))
    con.print(
        f"{len(diffs)} tensors matched, {same} identical; {len(diffs) - len(shown)} not shown"
    )
    return 0


COMMAND_MODULES = ("graphsurgeon.cli_search", "graphsurgeon.cli_artifacts")


def build_parser() -> argparse.ArgumentParser:
    from graphsurgeon import __version__

    parser = argparse.ArgumentParser(
        prog="graphsurgeon",
        description="Verified rewrite passes, compression and autotuning for ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"graphsurgeon {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="ops, inputs/outputs, per-layer params and FLOPs")
    p.add_argument("model")
    _add_shape(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list registered passes with options and search spaces")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("run", help="run a pass pipeline on a model")
    p.add_argument(
        "pipeline", help="YAML/JSON pipeline file, a named pipeline (cleanup) or a pass name"
    )
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    _add_shape(p)
    p.add_argument("--calib", help=".npz inputs keyed by input name (leading sample axis)")
    p.add_argument("--verify", choices=["structural", "numeric", "off"], default="structural")
    p.add_argument("--report", help="write per-pass statistics as JSON")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR as text after every pass")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sensitivity", help="drift per layer when only that layer is compressed")
    p.add_argument("model")
    p.add_argument("--pass", dest="pass_name", required=True, help="a registered lossy pass")
    p.add_argument("--options", help="base options, JSON or YAML: '{energy: 0.9}'")
    p.add_argument("--calib", required=True, help=".npz inputs the pass calibrates on")
    p.add_argument("--eval", help=".npz the metric is measured on (default: --calib)")
    p.add_argument("--metric", help="module:function or fidelity|top1|accuracy|default")
    p.add_argument("--option", help="the option to vary (default: the pass's strength option)")
    p.add_argument(
        "--strengths", nargs="+", help="values of that option, mildest first (0.99,0.9,0.7)"
    )
    p.add_argument("--layers", action="append", help="only these layer ids/regexes (repeatable)")
    p.add_argument("--max-samples", type=int, default=256, help="evaluation samples (256)")
    p.add_argument("--json", action="store_true")
    _add_shape(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("compare", help="cosine and SQNR of every intermediate tensor of B vs A")
    p.add_argument("model_a", metavar="A.onnx")
    p.add_argument("model_b", metavar="B.onnx")
    p.add_argument("--calib", required=True, help=".npz inputs both models run on")
    p.add_argument("--max-samples", type=int, default=16, help="samples to run (16)")
    p.add_argument("--top", type=int, default=30, help="rows to show, worst first (0: all)")
    p.add_argument("--json", action="store_true")
    _add_shape(p)
    p.set_defaults(func=cmd_compare)
    from graphsurgeon.cli_device import add_device_commands

    add_device_commands(sub, _add_shape)
    # Each command family lives in its own module with an ``add_commands(sub, add_shape)``.
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub, _add_shape)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GraphSurgeonError as e:
        if args.debug:
            raise
        print(f"graphsurgeon: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("graphsurgeon: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
