"""Verification after every pass.

Structural (always, unless ``--verify off``): the ONNX checker passes, shape inference runs,
no value dangles, and the graph's inputs and outputs keep their names, dtypes and ranks.

Numeric (``--verify numeric``): run the model before and after the pass in onnxruntime on the
same inputs. An exact pass must match within float tolerance, or the error names the pass and
the first output that diverged; a lossy pass reports its drift (max abs error, cosine, top-1
agreement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphsurgeon import onnx_api
from graphsurgeon.errors import VerificationError
from graphsurgeon.shapes import merge_inferred

# Exact passes reassociate float math (BN folding, Gemm fusion), so "equal" means
# |a - b| <= ATOL_REL * max(1, max|ref|) + RTOL * |ref|.
RTOL = 1e-3
ATOL_REL = 1e-4


@dataclass(frozen=True)
class Signature:
    inputs: tuple[tuple[str, object, int | None], ...]
    outputs: tuple[tuple[str, object, int | None], ...]

    @classmethod
    def of(cls, model: ir.Model) -> Signature:
        def sig(values):
            return tuple(
                (v.name, v.dtype, None if v.shape is None else len(v.shape))
                for v in values
                if not v.is_initializer()
            )

        return cls(sig(model.graph.inputs), sig(model.graph.outputs))


def check_structure(
    model: ir.Model, signature: Signature, *, step: str, strict_shapes: bool = True
) -> None:
    """Raise :class:`VerificationError` naming ``step`` if the model is structurally broken."""
    problem = dangling_value(model)
    if problem:
        raise VerificationError(f"{problem}", where=step)
    now = Signature.of(model)
    for kind, old, new in (
        ("input", signature.inputs, now.inputs),
        ("output", signature.outputs, now.outputs),
    ):
        if [o[0] for o in old] != [n[0] for n in new]:
            raise VerificationError(
                f"graph {kind}s changed from {[o[0] for o in old]} to {[n[0] for n in new]}",
                where=step,
            )
        for (name, dtype, rank), (_, dtype2, rank2) in zip(old, new, strict=False):
            if dtype2 != dtype or (rank is not None and rank2 is not None and rank2 != rank):
                raise VerificationError(
                    f"graph {kind} {name!r} changed type from {dtype}/rank {rank} to {dtype2}/rank {rank2}",
                    where=step,
                )
    try:
        inferred = onnx_api.check_and_infer(model, strict=strict_shapes)
    except Exception as e:
        raise VerificationError(f"fails the ONNX checker: {_first_line(e)}", where=step) from None
    if inferred is not None:  # annotate shapes for the next pass and for statistics
        merge_inferred(model, inferred)


def strict_shape_inference_ok(model: ir.Model) -> bool:
    """Whether the (unmodified) model passes strict shape inference; old models often don't."""
    try:
        onnx_api.check(model, full_check=True)
        return True
    except Exception:
        return False


def dangling_value(model: ir.Model) -> str | None:
    """A message for the first value used but not defined in scope, else None."""

    def visit(graph: ir.Graph, scope: set[ir.Value]) -> str | None:
        defined = set(scope) | set(graph.inputs) | set(graph.initializers.values())
        produced_here = {v for node in graph for v in node.outputs}
        for node in graph:
            for value in node.inputs:
                if value is not None and value not in defined:
                    where = (
                        "before the node that defines it (not topologically sorted)"
                        if value in produced_here
                        else "which no node, graph input or initializer defines"
                    )
                    return f"node {node.name or node.op_type!r} ({node.op_type}) reads {value.name!r}, {where}"
            for attr in node.attributes.values():
                subgraphs = []
                if attr.type == ir.AttributeType.GRAPH:
                    subgraphs = [attr.as_graph()]
                elif attr.type == ir.AttributeType.GRAPHS:
                    subgraphs = list(attr.as_graphs())
                for sub in subgraphs:
                    problem = visit(sub, defined)
                    if problem:
                        return problem
            defined.update(node.outputs)
        for value in graph.outputs:
            if value not in defined:
                return f"graph output {value.name!r} is not produced by any node"
        return None

    return visit(model.graph, set())


def compare_exact(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray]
) -> tuple[str, float] | None:
    """The first output that differs beyond tolerance, with its max abs error; None if equal."""
    for name, ref in before.items():
        got = after.get(name)
        if got is None or got.shape != ref.shape:
            return name, float("inf")
        if ref.dtype.kind in "OSU" or got.dtype.kind in "OSU":  # strings: equal or not
            if not np.array_equal(ref, got):
                return name, float("inf")
            continue
        r, g = ref.astype(np.float64), got.astype(np.float64)
        finite = np.isfinite(r)
        # NaN and inf must sit in the same places; finite values must agree within tolerance.
        if not np.array_equal(r[~finite], g[~finite], equal_nan=True):
            return name, float("inf")
        err = np.abs(r[finite] - g[finite])
        if not np.issubdtype(ref.dtype, np.floating):
            bound = np.zeros_like(err)
        else:
            scale = max(1.0, float(np.max(np.abs(r[finite]), initial=0.0)))
            bound = ATOL_REL * scale + RTOL * np.abs(r[finite])
        if np.any(~(err <= bound)):  # also catches NaN where the reference is finite
            return name, float(np.nanmax(np.where(np.isnan(err), np.inf, err)))
    return None


def drift(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per output: max abs error, cosine similarity, and top-1 agreement over the last axis."""
    out = {}
    for name, ref in before.items():
        got = after.get(name)
        if got is None or got.shape != ref.shape:
            out[name] = {"max_abs": float("inf"), "cosine": 0.0}
            continue
        if ref.dtype.kind in "OSU" or got.dtype.kind in "OSU":  # strings: equal or not
            same = bool(np.array_equal(ref, got))
            out[name] = {"max_abs": 0.0 if same else float("inf"), "cosine": float(same)}
            continue
        r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        denom = float(np.linalg.norm(r) * np.linalg.norm(g))
        entry = {
            "max_abs": float(np.max(np.abs(r - g), initial=0.0)),
            "cosine": float(r @ g / denom) if denom > 0 else float(np.array_equal(r, g)),
        }
        if ref.ndim >= 1 and ref.shape[-1] > 1 and np.issubdtype(ref.dtype, np.floating):
            entry["top1_agreement"] = float(np.mean(np.argmax(ref, -1) == np.argmax(got, -1)))
        out[name] = entry
    return out


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    for line in text.splitlines():
        if line.strip() and not line.startswith("=="):
            return line.strip()[:300]
    return type(error).__name__
