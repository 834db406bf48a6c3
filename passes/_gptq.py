"""GPTQ: quantize a weight matrix column by column, pushing each column's rounding error onto
the columns not yet quantized so that the layer's outputs on calibration data move least.

For a row ``w`` of ``V [N, K]`` and layer inputs ``X [n, K]``, the output error of a change
``dw`` is ``|X dw|^2 = dw^T H dw / 2`` with ``H = 2 X^T X / n`` (plus ``damp * mean(diag H)``
on the diagonal, which keeps it invertible). Quantizing column ``q`` with error
``e = (w_q - w_hat_q) / [H^-1]_qq`` and updating the remaining columns by
``w_F -= e * [H^-1]_{q,F}`` is the optimal brain surgeon step (OBQ); GPTQ keeps the columns in
their natural order, so one upper Cholesky factor ``U`` of ``H^-1`` gives every step's row
(``[H^-1]_{q,F} / [H^-1]_qq = U_{q,F} / U_qq``), and applies the updates lazily in blocks.
Each group's grid (scale, zero) is fitted when its first column comes up, on the already
updated weights.
"""

from __future__ import annotations

import math

import numpy as np
from graphsurgeon.passes._lowbit import Grid


def hessian(x: np.ndarray) -> np.ndarray:
    """``2 X^T X / n`` for inputs ``x [..., K]``."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return 2.0 * (x.T @ x) / max(len(x), 1)


def conv_columns(x: np.ndarray, node_attrs: dict, kernel: tuple[int, int], limit: int = 16384):
    """im2col: the ``[patches, C*kh*kw]`` rows a 2-D, group-1 Conv multiplies by its weight
    ``[O, C*kh*kw]`` (same flattening order), so that ``H = 2 X^T X / n`` is the Conv's GPTQ
    Hessian. ``node_attrs`` holds strides, pads and dilations; at most ``limit`` rows are
    kept (an even subsample: H is an average, not a sum). Returns None for ``auto_pad``."""
    kh, kw = kernel
    sh, sw = node_attrs.get("strides") or (1, 1)
    dh, dw = node_attrs.get("dilations") or (1, 1)
    pt, pl, pb, pr = node_attrs.get("pads") or (0, 0, 0, 0)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, OH, OW, kh, kw]
    cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)
    if len(cols) > limit:
        cols = cols[np.linspace(0, len(cols) - 1, limit).astype(np.int64)]
    return cols


def gptq_quantize(
    v: np.ndarray, h: np.ndarray, grid: Grid, group: int, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes ``[N, G, g]``, scales and zeros ``[N, G]`` for ``v [N, K]`` with Hessian ``h``."""
    n, k = v.shape
    groups = math.ceil(k / group)
    kp = groups * group
    w = np.zeros((n, kp))
    w[:, :k] = v
    hp = np.eye(kp)
    hp[:k, :k] = h
    dead = np.diag(hp) == 0
    hp[dead, dead] = 1.0
    w[:, dead] = 0.0
    hp[np.diag_indices(kp)] += damp * np.mean(np.diag(hp))
    u = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper: H^-1 = U^T U
    codes = np.zeros((n, kp), np.uint8)
    scale = np.zeros((n, groups))
    zero = np.zeros((n, groups))
    block = group * max(1, 128 // group)
    for i1 in range(0, kp, block):
        i2 = min(i1 + block, kp)
        w1 = w[:, i1:i2].copy()
        err = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                gi = col // group
                scale[:, gi], zero[:, gi] = grid.fit(w1[:, i : i + group])
            gi = col // group
            q = grid.codes(w1[:, i], scale[:, gi], zero[:, gi])
            codes[:, col] = q
            wq = (q - zero[:, gi]) * scale[:, gi]
            e = (w1[:, i] - wq) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return codes.reshape(n, groups, group), scale, zero
