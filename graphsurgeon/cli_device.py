"""CLI commands about devices: ``graphsurgeon profile ...`` and ``graphsurgeon measure``."""

from __future__ import annotations

import argparse
import json


def cmd_profile_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from graphsurgeon.profiles import load_profile, shipped_profiles

    rows = []
    for name in sorted(shipped_profiles()):
        p = load_profile(name)
        rows.append(
            {
                "name": name,
                "device": f"{p.device.vendor} {p.device.model}",
                "kind": p.device.kind,
                "fp32_tflops": p.peak["fp32"].dense,
                "bandwidth_gbs": p.memory.bandwidth_gbs,
                "backends": p.backends,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="shipped hardware profiles", title_justify="left")
    for col in ("name", "device", "kind", "fp32 TFLOP/s", "GB/s", "backends"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], r["device"], r["kind"], f"{r['fp32_tflops']:g}",
            f"{r['bandwidth_gbs']:g}", ", ".join(r["backends"]),
        )  # fmt: skip
    from graphsurgeon.cli import _console

    _console().print(table)
    return 0


def cmd_profile_show(args: argparse.Namespace) -> int:
    from graphsurgeon.profiles import dump_profile, load_profile

    print(dump_profile(load_profile(args.profile)), end="")
    return 0


def cmd_profile_detect(args: argparse.Namespace) -> int:
    from graphsurgeon.detect import detect_profile
    from graphsurgeon.model_io import atomic_write
    from graphsurgeon.profiles import dump_profile

    profile = detect_profile(quick=args.quick)
    text = dump_profile(profile)
    with atomic_write(args.output) as f:
        f.write(f"# measured by `graphsurgeon profile detect` on {profile.device.model}\n{text}")
    peak = ", ".join(f"{k} {v.dense:.3g} TFLOP/s" for k, v in profile.peak.items())
    print(f"wrote {args.output}: {profile.device.model}, {profile.device.cores} cores, {peak}")
    return 0


def cmd_profile_calibrate(args: argparse.Namespace) -> int:
    from graphsurgeon.latency_model import LatencyTable, calibrate, predict
    from graphsurgeon.model_io import load
    from graphsurgeon.profiles import load_profile
    from graphsurgeon.shapes import parse_shape_args

    profile = load_profile(args.profile)
    model = load(args.model, shapes=parse_shape_args(args.shape))
    table = LatencyTable.load(profile)
    if args.policies:
        from graphsurgeon.latency_fit import calibrate_policies

        summary = calibrate_policies(model, profile, table, policies=args.policies, log=print)
        added = summary["added"]
        print(
            f"corrections fitted on {summary['measured']} measured models "
            f"(RMS relative error {summary['fit_rms_relative_error']:.1%}): "
            + ", ".join(f"{op} x{s:.2f}" for op, s in sorted(table.scales.items()))
        )
    else:
        added = calibrate(model, profile, table)
    path = table.save(profile)
    guess = predict(model, profile, table)
    print(
        f"{added} new entries ({len(table.entries)} in all) in {path}; predicted latency "
        f"{guess.seconds * 1e3:.3f} ms ({guess.from_table} nodes from the table, "
        f"{guess.from_roofline} estimated from the table's per-op fit or the roofline)"
    )
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from graphsurgeon.data import load_npz
    from graphsurgeon.measure import measure_model
    from graphsurgeon.model_io import load
    from graphsurgeon.profiles import load_profile
    from graphsurgeon.shapes import parse_shape_args

    profile = load_profile(args.profile)
    backend = args.backend or profile.backends[0]
    shapes = parse_shape_args(args.shape)
    model = load(args.model, shapes=shapes)
    feeds = None
    if args.calib:
        feeds = load_npz(args.calib, model).feeds(1, batch_size=profile.measurement.batch)
    result = measure_model(model, profile, backend=backend, feeds=feeds, shapes=shapes)
    if args.json:
        print(
            json.dumps({"model": args.model, "profile": profile.name, **result.to_dict()}, indent=2)
        )
        return 0
    from graphsurgeon.cli import _console

    con = _console()
    stable = "" if result.stable else f" (not stable after {result.runs} runs)"
    con.print(f"[bold]{args.model}[/] on {profile.name} / {backend}, {result.threads} threads")
    con.print(
        f"latency: median {result.median_ms:.3f} ms, p90 {result.p90_ms:.3f} ms, "
        f"cv {result.cv:.3f}, {result.runs} runs{stable}"
    )
    if result.peak_rss_mb is not None:
        con.print(f"peak memory: {result.peak_rss_mb:.1f} MiB above the process before loading")
    flops = "?" if result.flops is None else f"{result.flops / 1e9:.3g} GFLOP"
    con.print(f"energy: {result.energy_mj:.3g} mJ per inference, {result.energy_source}; {flops}")
    return 0


def add_device_commands(sub: argparse._SubParsersAction, add_shape) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("profile", help="hardware profiles: list, show, detect, calibrate")
    psub = p.add_subparsers(dest="profile_command", required=True)
    q = psub.add_parser("list", help="the shipped profiles")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_profile_list)
    q = psub.add_parser("show", help="a profile as validated YAML")
    q.add_argument("profile", help="shipped name or YAML file")
    q.set_defaults(func=cmd_profile_show)
    q = psub.add_parser("detect", help="detect this machine and microbenchmark it")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--quick", action="store_true", help="smaller microbenchmarks")
    q.set_defaults(func=cmd_profile_detect)

    q = psub.add_parser("calibrate", help="fill the per-layer latency table for a model")
    q.add_argument("model")
    q.add_argument("--profile", required=True, help="shipped name or YAML file")
    q.add_argument(
        "--policies",
        type=int,
        default=0,
        help="also measure N random compressed variants whole and fit per-op corrections",
    )
    add_shape(q)
    q.set_defaults(func=cmd_profile_calibrate)

    p = sub.add_parser("measure", help="latency, peak memory and energy on a device profile")
    p.add_argument("model")
    p.add_argument("--profile", required=True, help="shipped name or YAML file")
    p.add_argument("--backend", help="default: the profile's first backend")
    add_shape(p)
    p.add_argument("--calib", help=".npz inputs to time with (default: generated)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_measure)


__all__ = ["add_device_commands"]
