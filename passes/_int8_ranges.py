"""Activation ranges for int8 quantization, from onnxruntime's calibrators plus an MSE search.

minmax, entropy and percentile compute what onnxruntime's calibrators (``MinMaxCalibrater``,
``EntropyCalibrater``, ``PercentileCalibrater``) compute, from one run of the model shared by
every method a quantization uses (:class:`ActivationRanges`). ORT has no MSE method; ``mse``
reuses the histograms ORT's percentile collector builds and picks the clipping range
minimizing the expected quantization error (:func:`mse_range`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.calibrate import CalibraterBase, HistogramCollector, TensorsData

from graphsurgeon.data import Feed
from graphsurgeon.memo import Memo, digest

Range = tuple[float, float]
METHODS = ("minmax", "percentile", "entropy", "mse")
ENTROPY_BINS = 512  # KL search cost grows with bins (ORT's search is a Python loop)
# Ranges are pure functions of (float model bytes, feeds, method): a search quantizes the same
# float model under many policies, and tensors upstream of its first change keep their
# histograms, so both levels are memoized on content.
_RANGES = Memo("activation_ranges", max_bytes=64 << 20)
_THRESHOLDS = Memo("histogram_thresholds", max_bytes=64 << 20)


@contextlib.contextmanager
def quiet_ort_tools() -> Iterator[None]:
    """ORT's quantization tools print progress and log advice; keep our CLI output clean."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


class ActivationRanges:
    """Per-tensor ranges of the float activations around ``op_types`` nodes, per method.

    onnxruntime's calibrators each build an augmented model, a session and a run over the
    feeds, one per method. Here one session (ORT's own settings: optimizations off) runs the
    feeds once for every method a quantization asks for: min/max come from its outputs, and
    the histograms are ORT's own :class:`HistogramCollector` fed exactly the batches ORT's
    calibrator would feed it, so the ranges are the ones ORT's calibrators compute. The tensors
    are the ones ORT selects (:meth:`CalibraterBase.select_tensors_to_calibrate`). Full
    activations are kept (as ORT's histogram calibrators keep them) only when :meth:`expect`
    was told of a histogram method, and only until both histograms are built.
    """

    def __init__(
        self,
        model_path: Path,
        work_dir: Path,
        feeds: Sequence[Feed],
        input_names: set[str],
        op_types: Sequence[str],
        num_bins: int,
    ) -> None:
        self.model_path, self.work_dir = model_path, work_dir
        self.feeds, self.input_names = feeds, input_names
        self.op_types, self.num_bins = list(op_types), num_bins
        self._expected: set[str] = set()
        self._collectors: dict[str, HistogramCollector] = {}
        self._minmax: dict[str, Range] | None = None
        self._arrays: dict[str, list[np.ndarray]] | None = None
        self._cache: dict[tuple[str, float, bool], dict[str, Range]] = {}
        self._digest: str | None = None

    def _content(self) -> str:
        """Digest of everything the ranges depend on: the model file (and its external
        data), the feeds, the calibrated op types and the histogram size."""
        if self._digest is None:
            parts: list[object] = [self.op_types, self.num_bins, sorted(self.input_names)]
            data = self.model_path.with_name(self.model_path.name + ".data")
            for path in (self.model_path, data):
                if path.exists():
                    parts.append(path.read_bytes())
            for feed in self.feeds:
                for name in sorted(feed):
                    if name in self.input_names:
                        parts += [name, np.asarray(feed[name])]
            self._digest = digest(*parts)
        return self._digest

    def expect(self, methods: set[str]) -> None:
        """The methods this quantization will ask for: the one run collects what they all
        need (full activations only when a histogram method is among them)."""
        self._expected = set(methods)

    def _run(self, keep: bool) -> None:
        """One run of the feeds through the model with every calibrated tensor an output:
        per-tensor min/max always, and the full activations when a histogram is expected."""
        model = onnx.load(str(self.model_path))
        inferred = onnx.shape_inference.infer_shapes(model)
        selector = SimpleNamespace(op_types_to_calibrate=self.op_types)
        tensors, value_infos = CalibraterBase.select_tensors_to_calibrate(selector, inferred)
        outputs = {o.name for o in model.graph.output}
        for name in sorted(tensors):
            if name not in outputs:
                model.graph.output.append(value_infos[name])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4
        if os.environ.get("GRAPHSURGEON_WORKER"):
            options.intra_op_num_threads = 1  # a search worker shares the cores with others
        if model.ByteSize() < (1 << 31) - (1 << 26):
            session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        else:
            path = self.work_dir / "calibration.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs() if o.name in tensors]
        lows: dict[str, list[float]] = {n: [] for n in names}
        highs: dict[str, list[float]] = {n: [] for n in names}
        arrays: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for feed in self.feeds:
            values = session.run(names, {k: v for k, v in feed.items() if k in self.input_names})
            for name, value in zip(names, values, strict=True):
                if value.size:
                    lows[name].append(float(np.min(value)))
                    highs[name].append(float(np.max(value)))
                if keep:
                    arrays[name].append(value)
        self._minmax = {
            n: (float(np.nanmin(lows[n])), float(np.nanmax(highs[n]))) for n in names if lows[n]
        }
        self._arrays = arrays if keep else None

    def _collector(self, kind: str) -> HistogramCollector:
        """ORT's histogram collector of ``kind`` (entropy, or the signed histogram that
        percentile and mse share), fed every batch in one call as ORT's calibrator does."""
        if kind not in self._collectors:
            collector = HistogramCollector(
                method="entropy" if kind == "entropy" else "percentile",
                # signed histogram (symmetric=False): both tails are cut, and MSE sees signs
                symmetric=False,
                # ORT's default of 128 bins for 128 quantized bins leaves the KL search one
                # candidate, the min/max range; more bins give it thresholds to choose from.
                num_bins=ENTROPY_BINS if kind == "entropy" else self.num_bins,
                num_quantized_bins=128 if kind == "entropy" else 2048,
                percentile=99.999,
                scenario="same",
            )
            if self._arrays is None:
                self._run(keep=True)
            assert self._arrays is not None
            with quiet_ort_tools():
                collector.collect(dict(self._arrays))
            self._collectors[kind] = collector
            if len(self._collectors) == 2:
                self._arrays = None  # both histograms built: the activations can go
        return self._collectors[kind]

    def get(
        self, method: str, percentile: float = 99.999, symmetric: bool = False
    ) -> dict[str, Range]:
        key = (method, percentile if method == "percentile" else 0.0, symmetric and method == "mse")
        if key not in self._cache:
            self._cache[key] = _RANGES.get(
                digest(self._content(), key),
                lambda: self._compute(method, percentile, symmetric),
            )
        return self._cache[key]

    def _compute(self, method: str, percentile: float, symmetric: bool) -> dict[str, Range]:
        if method == "minmax":
            if self._minmax is None:  # a histogram expected later shares this run
                self._run(keep=bool(self._expected & {"entropy", "percentile", "mse"}))
            assert self._minmax is not None
            return dict(self._minmax)
        if method == "mse":
            collector = self._collector("histogram")
            return {
                name: _THRESHOLDS.get(
                    digest("mse", h[0], h[1], float(h[2]), float(h[3]), symmetric),
                    lambda h=h: mse_range(
                        h[0], h[1], float(h[2]), float(h[3]), symmetric=symmetric
                    ),
                )
                for name, h in collector.histogram_dict.items()
            }
        collector = self._collector("histogram" if method == "percentile" else method)
        if method == "percentile":
            collector.percentile = percentile
        if method == "entropy":  # the same search as ORT's, without its Python loops
            collector.get_entropy_threshold = _memo_entropy_threshold
        kind = CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.Entropy
        with quiet_ort_tools():
            data = TensorsData(kind, collector.compute_collection_result())
        return {
            name: (float(np.min(d.range_value[0])), float(np.max(d.range_value[1])))
            for name, d in data.items()
        }


def _memo_entropy_threshold(histogram: Sequence, num_quantized_bins: int) -> tuple:
    h = histogram
    key = digest("entropy", h[0], h[1], float(h[2]), float(h[3]), num_quantized_bins)
    return _THRESHOLDS.get(key, lambda: entropy_threshold(histogram, num_quantized_bins))


def entropy_threshold(histogram: Sequence, num_quantized_bins: int) -> tuple:
    """onnxruntime's KL-divergence threshold search (``HistogramCollector.
    get_entropy_threshold``, TensorRT's method), every candidate window at once in numpy.

    For each candidate window ``[zero - i, zero + i]`` of the ``|x|``-symmetric histogram: the
    reference ``p`` is the window with the outliers folded into its edge bins; the candidate
    ``q`` merges the window into ``num_quantized_bins`` bins and spreads each back evenly over
    its non-empty source bins (integer division, as ORT does); both are smoothed (zeros get
    ``eps``, taken off the non-zeros) and the window with the smallest KL(p || q) wins.

    ORT loops over windows and bins in Python (~200 windows of up to 512 bins: 15 ms a tensor
    with numpy per window, far more in ORT). Here the windows are rows of one padded matrix:
    bin merges are differences of integer prefix sums (exact), smoothing and KL are float32
    like ORT's. Same inputs, same thresholds (tested against ORT).
    """
    hist = np.asarray(histogram[0]).astype(np.int64)
    edges = histogram[1]
    num_bins = hist.size
    zero, half, nq = num_bins // 2, num_quantized_bins // 2, num_quantized_bins
    dtype = edges.dtype
    i = np.arange(half, zero + 1)
    starts = zero - i
    ends = np.minimum(zero + i + 1, num_bins)
    lengths = ends - starts  # [W]
    width = int(lengths.max())
    col = np.arange(width)
    valid = col[None, :] < lengths[:, None]  # [W, width]
    idx = np.minimum(starts[:, None] + col[None, :], num_bins - 1)
    window = np.where(valid, hist[idx], 0)
    cumulative = np.concatenate([[0], np.cumsum(hist)])
    p = window.copy()
    rows = np.arange(len(i))
    p[:, 0] += cumulative[starts]
    p[rows, lengths - 1] += cumulative[-1] - cumulative[ends]
    nonzero = (p != 0) & valid
    # merge window bins into nq bins of `merged` source bins (the last takes the remainder)
    merged = lengths // nq
    whole = merged * nq
    win_cum = np.concatenate([np.zeros((len(i), 1), np.int64), np.cumsum(window, 1)], 1)
    nz_cum = np.concatenate([np.zeros((len(i), 1), np.int64), np.cumsum(nonzero, 1)], 1)
    j = np.arange(nq)
    lo, hi = j[None, :] * merged[:, None], (j[None, :] + 1) * merged[:, None]
    quantized = np.take_along_axis(win_cum, hi, 1) - np.take_along_axis(win_cum, lo, 1)
    quantized[:, -1] += win_cum[rows, lengths] - win_cum[rows, whole]
    norm = np.take_along_axis(nz_cum, hi, 1) - np.take_along_axis(nz_cum, lo, 1)
    spread = np.zeros_like(quantized)
    has = norm != 0
    spread[has] = (quantized[has] / norm[has]).astype(np.int64)  # ORT truncates too
    bin_of = np.minimum(col[None, :] // np.maximum(merged[:, None], 1), nq - 1)
    q = np.where(col[None, :] < whole[:, None], np.take_along_axis(spread, bin_of, 1), 0)
    ps, p_ok = _smooth(p, valid)
    qs, q_ok = _smooth(q, valid)
    # float32 sums over each row's own length: numpy's pairwise summation groups by length,
    # and near-tied windows flip on the last bit, so padding must not enter the sums
    with np.errstate(divide="ignore", invalid="ignore"):
        pk = ps / _row_sums(ps, lengths)[:, None]
        qk = qs / _row_sums(qs, lengths)[:, None]
        terms = np.where(valid, pk * np.log(pk / qk), np.float32(0))
        terms = np.where(valid & ~((pk > 0) & (qk > 0)), np.float32(np.inf), terms)
    divergences = np.where(p_ok & q_ok, _row_sums(terms, lengths), np.inf).astype(dtype)
    best = int(np.argmin(divergences))
    low, high = edges[starts[best]], edges[ends[best]]
    if low < histogram[2]:
        low = histogram[2]
    if high > histogram[3]:
        high = histogram[3]
    return (np.asarray(low, dtype=dtype), np.asarray(high, dtype=dtype))


def _row_sums(a: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.array([a[r, :n].sum() for r, n in enumerate(lengths)], dtype=a.dtype)


def _smooth(counts: np.ndarray, valid: np.ndarray, eps: float = 0.0001) -> tuple:
    """ORT's ``smooth_distribution`` per row (over its ``valid`` part), in float32 as ORT
    computes it; rows with no non-zero entry are flagged (ORT returns None for them)."""
    zeros = (counts == 0) & valid
    n_zeros = zeros.sum(1)
    n_nonzeros = valid.sum(1) - n_zeros
    eps1 = (eps * n_zeros / np.maximum(n_nonzeros, 1)).astype(np.float32)
    out = counts.astype(np.float32)
    out += np.float32(eps) * zeros.astype(np.float32) + (-eps1)[:, None] * (
        (~zeros & valid).astype(np.float32)
    )
    return np.where(valid, out, np.float32(0)), n_nonzeros > 0


def mse_range(
    hist: np.ndarray,
    edges: np.ndarray,
    lowest: float,
    highest: float,
    *,
    symmetric: bool = False,
    levels: int = 255,
    grid: int = 128,
) -> Range:
    """The clipping range ``[lo, hi]`` minimizing the expected quantization MSE.

    With ``levels`` steps the scale is ``s = (hi - lo) / levels``. A value inside the range
    is rounded to the grid: expected error ``s^2 / 12`` (uniform rounding noise); a value
    outside is clipped: error ``(x - clip(x))^2``. Over the calibration histogram (bin
    centers ``c_i``, frequencies ``p_i``)::

        MSE(lo, hi) = sum_{c_i < lo} p_i (c_i - lo)^2 + sum_{c_i > hi} p_i (c_i - hi)^2
                      + (hi - lo)^2 / (12 levels^2) * sum_{lo <= c_i <= hi} p_i

    Shrinking the range trades clipping error on the tails for finer steps everywhere. Each
    tail term depends on one end only, so ``grid`` candidates per end (fractions of the
    observed min and max) give ``grid^2`` ranges for the price of ``2 grid`` tail sums. The
    range always contains 0 (zero must be exact); ``symmetric`` searches ``[-m, m]``.
    """
    total = float(hist.sum())
    lo, hi = min(lowest, 0.0), max(highest, 0.0)
    if total <= 0 or hi - lo <= 0:
        return lo, hi
    if symmetric:
        lo, hi = -max(-lo, hi), max(-lo, hi)
    centers = (edges[:-1].astype(np.float64) + edges[1:].astype(np.float64)) / 2
    p = hist.astype(np.float64) / total
    fractions = np.linspace(1.0 / grid, 1.0, grid)
    cand_lo, cand_hi = fractions * lo, fractions * hi  # [G] each
    below = centers[None, :] < cand_lo[:, None]  # [G, bins]
    above = centers[None, :] > cand_hi[:, None]
    clip_lo = (np.where(below, (centers - cand_lo[:, None]) ** 2, 0.0) * p).sum(1)
    clip_hi = (np.where(above, (centers - cand_hi[:, None]) ** 2, 0.0) * p).sum(1)
    inside = 1.0 - (below * p).sum(1)[:, None] - (above * p).sum(1)[None, :]  # [G_lo, G_hi]
    width = cand_hi[None, :] - cand_lo[:, None]
    mse = clip_lo[:, None] + clip_hi[None, :] + width**2 / (12 * levels**2) * inside
    if symmetric:
        best = int(np.argmin(np.diagonal(mse)))
        return float(cand_lo[best]), float(cand_hi[best])
    i, j = np.unravel_index(int(np.argmin(mse)), mse.shape)
    return float(cand_lo[i]), float(cand_hi[j])
