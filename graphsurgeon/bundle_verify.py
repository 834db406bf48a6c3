"""``graphsurgeon verify BUNDLE --reference MODEL``: does the bundle do what it claims?

Checks, in order (the first failure is the headline, all are reported):

1. **integrity**: every file the manifest lists is there with its sha256;
2. **interface**: the reference takes and returns the same names as the bundle;
3. **backend**: the bundle's compiled backend (TVM library, Triton kernels) gives the outputs
   of its own ``model.onnx`` in onnxruntime (what was compiled is what was verified);
4. **fidelity**: the bundle's outputs against the reference model's, in onnxruntime, on the
   data given (else generated inputs): cosine at least the bundle's ``acceptance.min_cosine``
   (or ``--min-cosine``), and, with labels and ``acceptance.max_accuracy_drop``, accuracy no
   more than that below the reference's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphsurgeon import execution
from graphsurgeon.bundle import MODEL
from graphsurgeon.data import Dataset, Feed, load_npz
from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import load
from graphsurgeon.runtime import _ort_runner, check_bundle
from graphsurgeon.runtime import load as load_bundle
from graphsurgeon.verify import drift

DEFAULT_MIN_COSINE = 0.99
_BACKEND_MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999}

__all__ = ["Check", "VerifyResult", "verify_bundle"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyResult:
    bundle: str
    backend: str
    samples: int
    checks: list[Check] = field(default_factory=list)
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "backend": self.backend,
            "samples": self.samples,
            "ok": self.ok,
            "checks": [c.__dict__ for c in self.checks],
            "fidelity": self.fidelity,
            "accuracy": self.accuracy,
        }


def _fixed_shapes(manifest: dict[str, Any]) -> dict[str, list[int]] | None:
    shapes = (manifest.get("metrics") or {}).get("shapes")
    return {k: list(v) for k, v in shapes.items()} if isinstance(shapes, dict) else None


def _feeds(
    reference_path: Path, reference, data: str | os.PathLike | None, manifest, max_samples: int
) -> tuple[list[Feed], np.ndarray | None]:
    """Inputs to compare on; a backend compiled for fixed shapes gets batches of that shape."""
    from graphsurgeon.compiler import static_feeds
    from graphsurgeon.profiles import HardwareProfile

    fixed = _fixed_shapes(manifest)
    if data is None:
        profile = HardwareProfile.model_validate(manifest["profile"])
        feeds = static_feeds(reference, profile, None, fixed)
        return feeds, None
    dataset: Dataset = load_npz(data, reference)
    batch = None
    if fixed:
        batch = next(iter(fixed.values()))[0] if all(dataset.batched.values()) else None
    feeds = dataset.feeds(max_samples, batch_size=batch or 16)
    if fixed:
        feeds = [f for f in feeds if all(list(f[k].shape) == v for k, v in fixed.items() if k in f)]
        if not feeds:
            raise GraphSurgeonError(
                f"no sample of {Path(data).name} has the shapes the bundle was compiled for "
                f"({fixed})"
            )
    n = (
        sum(len(next(iter(f.values()))) for f in feeds)
        if all(dataset.batched.values())
        else len(feeds)
    )
    labels = None if dataset.labels is None else dataset.labels[:n]
    return feeds, labels


def _stack(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        k: np.concatenate([np.asarray(r[k]).reshape(-1, *np.shape(r[k])[1:]) for r in runs])
        for k in runs[0]
    }


def verify_bundle(
    bundle: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    max_samples: int = 256,
    min_cosine: float | None = None,
    backend: str | None = None,
) -> VerifyResult:
    root = Path(bundle)
    manifest = check_bundle(root)  # raises on a missing or altered file
    result = VerifyResult(str(root), backend or manifest.get("backend", "ort-cpu"), 0)
    result.checks.append(Check("integrity", True, f"{len(manifest['files'])} files match"))

    ref_model = load(reference)
    ref_inputs = [v.name for v in ref_model.graph.inputs if not v.is_initializer()]
    ref_outputs = [v.name for v in ref_model.graph.outputs]
    signature = manifest.get("signature") or {}
    b_inputs = [i["name"] for i in signature.get("inputs", [])]
    b_outputs = [o["name"] for o in signature.get("outputs", [])]
    same = ref_inputs == b_inputs and ref_outputs == b_outputs
    result.checks.append(
        Check(
            "interface",
            same,
            "same input and output names"
            if same
            else f"bundle takes {b_inputs} -> {b_outputs}, reference {ref_inputs} -> {ref_outputs}",
        )
    )
    if not same:
        return result

    feeds, labels = _feeds(Path(reference), ref_model, data, manifest, max_samples)
    runnable = load_bundle(root, backend=backend, strict=True)
    result.backend = runnable.backend
    got = _stack([runnable(f) for f in feeds])
    result.samples = len(next(iter(got.values())))

    if not runnable.backend.startswith("ort"):
        plain = _ort_runner(root / MODEL)
        own = _stack([plain(f) for f in feeds])
        precision = "fp16" if runnable.backend.startswith("triton") else "fp32"
        worst = min(d["cosine"] for d in drift(own, got).values())
        ok = worst >= _BACKEND_MIN_COSINE[precision]
        result.checks.append(
            Check(
                "backend", ok, f"{runnable.backend} vs {MODEL} in onnxruntime: cosine {worst:.6f}"
            )
        )

    session = execution.make_session(ref_model)
    expected = _stack([execution.run(session, f) for f in feeds])
    result.fidelity = drift(expected, got)
    acceptance = manifest.get("acceptance") or {}
    threshold = (
        min_cosine if min_cosine is not None else acceptance.get("min_cosine", DEFAULT_MIN_COSINE)
    )
    worst = min(d["cosine"] for d in result.fidelity.values())
    result.checks.append(
        Check(
            "fidelity",
            worst >= threshold,
            f"cosine vs reference {worst:.6f} (needs >= {threshold:.4f})",
        )
    )
    drop_limit = acceptance.get("max_accuracy_drop")
    if acceptance.get("metric", "accuracy") != "accuracy":
        drop_limit = None  # the limit was on another metric (fidelity): reported, not checked
    if labels is not None:
        first = ref_outputs[0]
        acc_ref = float(np.mean(np.argmax(expected[first], -1) == labels))
        acc_got = float(np.mean(np.argmax(got[first], -1) == labels))
        result.accuracy = {"reference": acc_ref, "bundle": acc_got}
        if drop_limit is not None:
            ok = acc_ref - acc_got <= drop_limit + 1e-9
            result.checks.append(
                Check(
                    "accuracy",
                    ok,
                    f"accuracy {acc_got:.4f} vs reference {acc_ref:.4f} (drop allowed {drop_limit})",
                )
            )
    return result
