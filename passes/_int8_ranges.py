"""Activation ranges for int8 quantization, from onnxruntime's calibrators plus an MSE search.

minmax, entropy and percentile are onnxruntime's own calibrators (``MinMaxCalibrater``,
``EntropyCalibrater``, ``PercentileCalibrater``), run on the model once per method actually
used. ORT has no MSE method; ``mse`` reuses the histograms ORT's percentile collector builds
and picks the clipping range minimizing the expected quantization error (:func:`mse_range`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
from onnxruntime.quantization.calibrate import CalibraterBase

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


class FeedReader(CalibrationDataReader):
    """ORT's data reader interface over our calibration feeds (one pass, then ``None``)."""

    def __init__(self, feeds: Sequence[Feed], input_names: set[str]) -> None:
        self._feeds = [{k: v for k, v in f.items() if k in input_names} for f in feeds]
        self._next = 0

    def get_next(self) -> Feed | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def __len__(self) -> int:
        return len(self._feeds)


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

    Each calibrator runs the model over the feeds once, lazily, the first time its method is
    asked for; percentile and mse share one histogram collection.
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
        self._calibrators: dict[str, object] = {}
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

    def _calibrator(self, kind: str) -> CalibraterBase:
        if kind not in self._calibrators:
            method, extra = {
                "minmax": (CalibrationMethod.MinMax, {}),
                # ORT's default of 128 bins for 128 quantized bins leaves the KL search one
                # candidate, the min/max range; more bins give it thresholds to choose from.
                "entropy": (CalibrationMethod.Entropy, {"num_bins": ENTROPY_BINS}),
                # signed histogram (symmetric=False): both tails are cut, and MSE sees signs
                "histogram": (
                    CalibrationMethod.Percentile,
                    {"symmetric": False, "num_bins": self.num_bins},
                ),
            }[kind]
            with quiet_ort_tools():
                calibrator = create_calibrator(
                    self.model_path,
                    self.op_types,
                    augmented_model_path=str(self.work_dir / f"augmented_{kind}.onnx"),
                    calibrate_method=method,
                    extra_options=extra,
                )
                calibrator.collect_data(FeedReader(self.feeds, self.input_names))
            self._calibrators[kind] = calibrator
        return self._calibrators[kind]

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
        if method == "mse":
            collector = self._calibrator("histogram").collector
            ranges = {
                name: _THRESHOLDS.get(
                    digest("mse", h[0], h[1], float(h[2]), float(h[3]), symmetric),
                    lambda h=h: mse_range(
                        h[0], h[1], float(h[2]), float(h[3]), symmetric=symmetric
                    ),
                )
                for name, h in collector.histogram_dict.items()
            }
        else:
            calibrator = self._calibrator("histogram" if method == "percentile" else method)
            if method == "percentile":
                calibrator.collector.percentile = percentile
            if method == "entropy":  # the same search as ORT's, without its Python loops
                calibrator.collector.get_entropy_threshold = _memo_entropy_threshold
            with quiet_ort_tools():
                data = calibrator.compute_data()
            ranges = {
                name: (float(np.min(d.range_value[0])), float(np.max(d.range_value[1])))
                for name, d in data.items()
            }
        return ranges


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
