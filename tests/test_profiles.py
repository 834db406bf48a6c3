"""Hardware profiles, the measurement harness, the energy model and `profile detect`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from graphsurgeon.energy import RaplCounter, estimate_energy
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.measure import coefficient_of_variation, percentile, timed_runs
from graphsurgeon.profiles import HardwareProfile, load_profile, shipped_profiles

CLI = [sys.executable, "-m", "graphsurgeon.cli"]
REQUIRED = {
    "x86-avx2",
    "x86-avx512-vnni",
    "arm64-neon",
    "nvidia-a100",
    "nvidia-h100-sxm",
    "nvidia-h200",
}


def test_every_required_profile_is_shipped_and_valid() -> None:
    names = set(shipped_profiles())
    assert names >= REQUIRED
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.sources, f"{name} names no sources"
        covered = {f.split(".")[0] for s in profile.sources for f in s.fields}
        assert {"peak", "power"} <= covered, f"{name}: peak and power numbers need sources"
        # the energy coefficients follow from the profile's own numbers
        for dtype, pj in profile.power.pj_per_flop.items():
            expected = (profile.power.tdp_w - profile.power.idle_w) / profile.peak[dtype].dense
            assert pj == pytest.approx(expected, rel=1e-2)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["peak"]["fp32"].update(dense=-1), "peak.fp32.dense"),
        (lambda d: d["memory"].pop("bandwidth_gbs"), "memory.bandwidth_gbs"),
        (lambda d: d["device"].update(cores="many"), "device.cores"),
        (lambda d: d.update(backends=["ort-cpu", "ort-cuda"]), "cannot list"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["power"].update(idle_w=900), "idle_w must be below tdp_w"),
        (lambda d: d.update(sources=[]), "must name its sources"),
        (lambda d: d["measurement"].update(max_repeats=3), "max_repeats"),
        (lambda d: d["peak"].update(fp99={"dense": 1}), "peak.fp99"),
    ],
)
def test_bad_profile_is_rejected_naming_the_field(tmp_path: Path, edit, field: str) -> None:
    data = yaml.safe_load(shipped_profiles()["x86-avx2"].read_text())
    edit(data)
    with pytest.raises(GraphSurgeonError) as info:
        load_profile(_write(tmp_path, data))
    assert field in str(info.value) and "p.yaml" in str(info.value)


def test_bad_profile_from_the_cli_is_one_line(tmp_path: Path, digits) -> None:
    data = yaml.safe_load(shipped_profiles()["x86-avx2"].read_text())
    data["memory"]["bandwidth_gbs"] = 0
    path = _write(tmp_path, data)
    result = subprocess.run(
        [*CLI, "measure", str(digits["model"]), "--profile", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "memory.bandwidth_gbs" in result.stderr
    assert "Traceback" not in result.stderr


class _FakeSession:
    def __init__(self) -> None:
        self.calls = 0

    def run(self, _names, _feed):
        self.calls += 1


def test_timed_runs_stops_when_stable_or_capped() -> None:
    session = _FakeSession()
    times, stable = timed_runs(session, [{}], warmup=3, repeats=10, max_repeats=50, target_cv=1e9)
    assert stable and len(times) == 10 and session.calls == 13
    session = _FakeSession()
    times, stable = timed_runs(session, [{}], warmup=0, repeats=10, max_repeats=35, target_cv=0.0)
    assert not stable and len(times) == 40  # whole rounds until past the cap


def test_statistics_math() -> None:
    times = [1.0, 2.0, 3.0, 4.0]
    assert coefficient_of_variation(times) == pytest.approx((1.25**0.5) / 2.5)
    assert percentile(times, 50) == pytest.approx(2.5)
    assert percentile(times, 90) == pytest.approx(3.7)


def test_energy_estimate_math() -> None:
    profile = load_profile("x86-avx512-vnni")
    ops = {"fp32": 2e9, "int8": 1e9, "fp8": 1e6}  # fp8 has no coefficient: charged as fp32
    est = estimate_energy(profile, 0.01, ops, dram_bytes=5e7, cores_used=64)
    pj = profile.power.pj_per_flop
    compute = (2e9 * pj["fp32"] + 1e9 * pj["int8"] + 1e6 * pj["fp32"]) * 1e-12
    memory = 5e7 * profile.power.pj_per_dram_byte * 1e-12
    static = profile.power.idle_w * (64 / profile.device.cores) * 0.01
    assert est.compute_j == pytest.approx(compute)
    assert est.memory_j == pytest.approx(memory)
    assert est.static_j == pytest.approx(static)
    assert est.joules == pytest.approx(compute + memory + static)


def test_rapl_counter_reads_packages_and_handles_wrap(tmp_path: Path) -> None:
    for name, folder in (("package-0", "intel-rapl:0"), ("core", "intel-rapl:0:0")):
        d = tmp_path / folder
        d.mkdir()
        (d / "name").write_text(name)
        (d / "energy_uj").write_text("900")
        (d / "max_energy_range_uj").write_text("1000")
    counter = RaplCounter(str(tmp_path))
    assert counter.available and len(counter.domains) == 1  # sub-domains are not summed twice
    start = counter.read()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("100")  # wrapped past 1000
    assert counter.joules_between(start, counter.read()) == pytest.approx(200e-6)


def test_detect_runs_here_and_writes_a_valid_profile(tmp_path: Path) -> None:
    out = tmp_path / "local.yaml"
    result = subprocess.run(
        [*CLI, "profile", "detect", "--quick", "-o", str(out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    profile = HardwareProfile.model_validate(yaml.safe_load(out.read_text()))
    assert profile.measured and profile.device.kind == "cpu"
    bench = profile.microbenchmarks["ort-cpu"]
    assert bench["gemm_fp32_tflops"] > 0 and bench["gemm_int8_tops"] > 0
    assert profile.memory.bandwidth_gbs > 0 and bench["launch_overhead_us"] > 0


def test_measure_cli_json(digits) -> None:
    result = subprocess.run(
        [
            *CLI,
            "measure",
            str(digits["model"]),
            "--profile",
            "x86-avx512-vnni",
            "--shape",
            "input=1x1x8x8",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["runs"] >= 30 and data["median_ms"] > 0 and data["p90_ms"] >= data["median_ms"]
    assert data["energy_source"] in ("measured (RAPL)", "estimated (profile model)")
    assert data["flops"] == 973_642  # 2 x MACs + bias adds, as `inspect` computes them
    assert data["threads"] >= 1


def test_measure_refuses_a_backend_the_profile_lacks(digits) -> None:
    result = subprocess.run(
        [*CLI, "measure", str(digits["model"]), "--profile", "x86-avx2", "--backend", "ort-cuda"],
        capture_output=True,
        text=True,
    )
    assert (
        result.returncode == 2 and "ort-cuda" in result.stderr and "Traceback" not in result.stderr
    )


# -- latency model ---------------------------------------------------------------------------
def test_latency_model_calibrates_every_node_and_persists(
    digits, tmp_path: Path, monkeypatch
) -> None:
    import graphsurgeon as gs
    from graphsurgeon.latency_model import LatencyTable, calibrate, predict

    monkeypatch.setenv("GRAPHSURGEON_CACHE", str(tmp_path))
    profile = load_profile("x86-avx512-vnni")
    model = gs.load(digits["model"], shapes={"input": [1, 1, 8, 8]})
    before = predict(model, profile, LatencyTable(profile.name))
    assert before.from_table == 0 and before.seconds > 0  # all roofline
    table = LatencyTable.load(profile)
    assert calibrate(model, profile, table, repeats=5) > 0
    after = predict(model, profile, table)
    assert after.from_roofline == 0 and after.from_table == before.from_roofline
    path = table.save(profile)
    assert path.parent == tmp_path / "latency"
    again = LatencyTable.load(profile)
    assert again.entries == table.entries
    assert calibrate(model, profile, again, repeats=5) == 0  # nothing new to measure


def test_node_signature_tracks_work_not_names(digits) -> None:
    import graphsurgeon as gs
    from graphsurgeon.latency_model import node_signature
    from graphsurgeon.layers import find_layers
    from graphsurgeon.shapes import ShapeInferencePass

    model = gs.load(digits["model"], shapes={"input": [1, 1, 8, 8]})
    ShapeInferencePass()(model)
    layer = find_layers(model)[1]
    sig = node_signature(layer.node, layer)
    layer.node.name = "renamed"
    assert node_signature(layer.node, layer) == sig
    weight = layer.weight.numpy().copy()
    weight[: weight.shape[0] // 2] = 0  # half the filters zeroed: sparsity is part of the key
    import onnx_ir as ir

    layer.weight_value.const_value = ir.tensor(weight, name=layer.weight_value.name)
    (layer,) = [x for x in find_layers(model) if x.node is layer.node]
    assert node_signature(layer.node, layer) != sig


def test_roofline_is_the_slower_of_compute_and_memory() -> None:
    from graphsurgeon.latency_model import roofline_seconds

    profile = load_profile("nvidia-h100-sxm")
    flops, nbytes = 1e12, 1e6
    assert roofline_seconds(profile, flops, nbytes, "bf16") == pytest.approx(flops / 989.5e12)
    assert roofline_seconds(profile, 1e3, 1e9, "bf16") == pytest.approx(1e9 / 3350e9)
    assert roofline_seconds(profile, flops, 0, "int4") == pytest.approx(
        flops / 67e12
    )  # no int4 peak: fp32


def test_profile_calibrate_with_policies_fits_corrections(digits, tmp_path: Path) -> None:
    """`profile calibrate --policies 2`: the original and two random variants are timed node by
    node and whole; the table file keeps entries, their cost features and the fitted scales."""
    import json

    env = {**os.environ, "GRAPHSURGEON_CACHE": str(tmp_path)}
    result = subprocess.run(
        [
            *CLI,
            "profile",
            "calibrate",
            str(digits["model"]),
            "--profile",
            "x86-avx512-vnni",
            "--shape",
            "input=8x1x8x8",
            "--policies",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "corrections fitted on 3 measured models" in result.stdout
    (path,) = (tmp_path / "latency").glob("x86-avx512-vnni-*.json")
    data = json.loads(path.read_text())
    assert set(data["features"]) == set(data["entries"])
    assert {"Conv", "Gemm"} <= set(data["scales"])
    assert all(v >= 0 for v in data["scales"].values())


def test_runtime_graph_is_what_onnxruntime_runs(digits) -> None:
    """The latency model times the optimizer's graph: Relu fused away into the convolutions
    and the hidden Gemm, every node with a signature (reorder tokens' shapes filled in by a
    probe run), and it computes what the source computes."""
    import numpy as np
    import onnx_ir as ir

    import graphsurgeon as gs
    from graphsurgeon.latency import session_for
    from graphsurgeon.latency_model import node_signature, runtime_graph

    model = gs.load(digits["model"], shapes={"input": [4, 1, 8, 8]})
    rt = runtime_graph(model)
    ops = [n.op_type for n in rt.graph]
    assert "Relu" in [n.op_type for n in model.graph] and "Relu" not in ops
    assert len(ops) < len(list(model.graph))
    assert all(node_signature(n) is not None for n in rt.graph)
    x = {"input": np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)}
    (want,) = session_for(ir.to_proto(model).SerializeToString()).run(None, x)
    (got,) = session_for(ir.to_proto(rt).SerializeToString(), optimize=False).run(None, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
