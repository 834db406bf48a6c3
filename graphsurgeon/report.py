"""``report.html``: one self-contained page for a tune or optimize run.

No network and no external script: plots are inline SVG drawn here, styles are inline, and the
only script is a few lines that sort tables when a header is clicked. The page renders from
a plain data dict so that every number in it is one the run measured (or labelled estimated)::

    {"title": str, "model": {"path", "nodes", "params", "bytes"}, "profile": str,
     "metric": str (the y axis: accuracy, cosine...),
     "objectives": [str], "summary": [[label, value], ...],
     "points": [{"id", "accuracy", "latency_ms", "size_bytes", "energy_mj", "energy_kind",
                 "pareto": bool, "policy": str, "status": str, "measured": bool}],
     "baselines": [{"name", "accuracy", "latency_ms", "size_bytes", "energy_mj",
                    "energy_kind"}],
     "layers": [{"layer", "op", "decision", "sensitivity"}],
     "passes": [{"pass", "time_s"}], "stages": [{"stage", "status", "seconds", "detail"}],
     "notes": [str]}

Every key is optional; a missing section is left out rather than drawn empty.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from graphsurgeon.model_io import atomic_write

__all__ = ["render_report", "write_report"]

# baselines, one color each (a legend under each plot names them)
_PALETTE = ("#cf222e", "#8250df", "#bf8700", "#0969da", "#953800", "#1b7c83", "#6e7781")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#1b1f24;background:#fff;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;
padding-bottom:4px}.muted{color:#57606a}table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;cursor:pointer;user-select:none}td.num{text-align:right;
font-variant-numeric:tabular-nums}tr.best td{background:#dafbe1}.tag{display:inline-block;
padding:0 6px;border-radius:8px;font-size:12px}.measured{background:#dafbe1}
.estimated{background:#fff8c5}.failed{background:#ffebe9}.plots{display:flex;flex-wrap:wrap;
gap:16px}.plots figure{margin:0}figcaption{font-size:12px;color:#57606a}
svg text{font:11px system-ui,sans-serif;fill:#1b1f24}
"""

# Sorts a table by the clicked column (numbers numerically); nothing else runs.
_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th){
  th.addEventListener('click',function(){
    var table=th.closest('table'),body=table.tBodies[0],i=th.cellIndex;
    var asc=th.dataset.dir!=='asc';th.dataset.dir=asc?'asc':'desc';
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[i].dataset.v||a.cells[i].textContent,y=b.cells[i].dataset.v||b.cells[i].textContent;
      var nx=parseFloat(x),ny=parseFloat(y);
      var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});
  });
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not _finite(x):
        return _e(x)
    if unit == "B":
        for scale, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
            if abs(x) >= scale:
                return f"{x / scale:.2f} {suffix}"
        return f"{x:.0f} B"
    if abs(x) >= 1000 or x == int(x):
        text = f"{x:,.0f}" if abs(x) >= 1000 else f"{x:g}"
    else:
        text = f"{x:.4g}"
    return f"{text} {unit}".strip()


def _energy(value: Any, kind: Any) -> str:
    if value is None:
        return "-"
    label = str(kind or "estimated")
    cls = "measured" if label.startswith("measured") else "estimated"
    return f'{_fmt(value, "mJ")} <span class="tag {cls}">{_e(label)}</span>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[tuple[str, Any]]], cls: str = "") -> str:
    """``rows`` hold ``(html, sort_value)`` cells; the sort value drives the click-sort."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for text, value in row:
            num = _finite(value)
            attr = f' data-v="{value!r}"' if num else ""
            cells.append(f"<td{' class=num' if num else ''}{attr}>{text}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (
        f'<table class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _scatter(
    points: Sequence[Mapping[str, Any]],
    baselines: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    x_label: str,
    y_label: str,
) -> str | None:
    """An SVG scatter of every evaluated point, the Pareto front joined by a line and the
    baselines as labelled squares. Returns None when there is nothing to draw."""
    pts = [p for p in points if _finite(p.get(x_key)) and _finite(p.get(y_key))]
    base = [b for b in baselines if _finite(b.get(x_key)) and _finite(b.get(y_key))]
    if not pts and not base:
        return None
    xs = [p[x_key] for p in [*pts, *base]]
    ys = [p[y_key] for p in [*pts, *base]]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 0.5 * (abs(x0) or 1), x1 + 0.5 * (abs(x1) or 1)
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
    w, h, left, bottom, top, right = 500, 330, 62, 40, 14, 34

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (w - left - right)

    def sy(v: float) -> float:
        return h - bottom - (v - y0) / (y1 - y0) * (h - bottom - top)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        f'aria-label="{_e(y_label)} against {_e(x_label)}">',
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
        'fill="#fff" stroke="#d0d7de"/>',
    ]
    for i in range(5):  # ticks
        fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts.append(
            f'<text x="{sx(fx):.1f}" y="{h - bottom + 14}" text-anchor="middle">{_fmt(fx)}</text>'
        )
        parts.append(
            f'<text x="{left - 4}" y="{sy(fy) + 4:.1f}" text-anchor="end">{_fmt(fy)}</text>'
        )
    parts.append(
        f'<text x="{(w + left) / 2:.0f}" y="{h - 6}" text-anchor="middle">{_e(x_label)}</text>'
    )
    parts.append(
        f'<text transform="translate(12,{(h - bottom) / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{_e(y_label)}</text>'
    )
    front = _front_2d(pts, x_key, y_key)
    if len(front) > 1:  # a staircase: each step holds its accuracy until a better one
        coords = [(sx(front[0][x_key]), sy(front[0][y_key]))]
        for p in front[1:]:
            coords += [(sx(p[x_key]), coords[-1][1]), (sx(p[x_key]), sy(p[y_key]))]
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#1a7f37" stroke-width="1.5"/>')
    for p in pts:
        on_front = bool(p.get("pareto"))
        parts.append(
            f'<circle cx="{sx(p[x_key]):.1f}" cy="{sy(p[y_key]):.1f}" r="{4 if on_front else 2.5}" '
            f'fill="{"#1a7f37" if on_front else "#8c959f"}" fill-opacity="0.85">'
            f"<title>{_e(p.get('id', ''))}: {_e(p.get('policy', ''))}</title></circle>"
        )
    for i, b in enumerate(base):
        bx, by = sx(b[x_key]), sy(b[y_key])
        color = _PALETTE[i % len(_PALETTE)]
        parts.append(
            f'<rect x="{bx - 4:.1f}" y="{by - 4:.1f}" width="8" height="8" fill="{color}" '
            f'stroke="#fff" stroke-width="0.5"><title>{_e(b.get("name", ""))}</title></rect>'
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span style="white-space:nowrap;margin-right:10px"><span style="display:inline-block;'
        f'width:9px;height:9px;background:{_PALETTE[i % len(_PALETTE)]}"></span> '
        f"{_e(b.get('name', ''))}</span> "
        for i, b in enumerate(base)
    )
    if legend:
        parts.append(f'<div style="max-width:{w}px;font-size:12px">{legend}</div>')
    return "".join(parts)


def _front_2d(points: Sequence[Mapping[str, Any]], x_key: str, y_key: str) -> list:
    """Points no other point beats on both axes (lower x, higher y), by ascending x."""
    front: list = []
    for p in sorted(points, key=lambda p: (p[x_key], -p[y_key])):
        if not front or p[y_key] > front[-1][y_key]:
            front.append(p)
    return front


def render_report(data: Mapping[str, Any]) -> str:
    """The HTML page for ``data`` (see the module docstring for its keys)."""
    title = str(data.get("title") or "graphsurgeon report")
    out = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    model = data.get("model") or {}
    facts = [f"model <b>{_e(model['path'])}</b>"] if model.get("path") else []
    if data.get("profile"):
        facts.append(f"profile <b>{_e(data['profile'])}</b>")
    if data.get("objectives"):
        facts.append("objectives " + ", ".join(_e(o) for o in data["objectives"]))
    if facts:
        out.append(f'<p class="muted">{" · ".join(facts)}</p>')

    if data.get("summary"):
        rows = [[(_e(k), None), (_e(v), None)] for k, v in data["summary"]]
        out.append("<h2>Summary</h2>" + _table(["", "value"], rows))

    points = list(data.get("points") or [])
    baselines = list(data.get("baselines") or [])
    plots = []
    y_label = str(data.get("metric") or "accuracy")
    for x_key, x_label in (("latency_ms", "latency (ms)"), ("size_bytes", "size (bytes)")):
        svg = _scatter(points, baselines, x_key, "accuracy", x_label, y_label)
        if svg:
            plots.append(
                f"<figure>{svg}<figcaption>{_e(y_label)} against {x_label}</figcaption></figure>"
            )
    if any(_finite(p.get("energy_mj")) for p in points):
        svg = _scatter(points, baselines, "energy_mj", "accuracy", "energy (mJ)", y_label)
        if svg:
            plots.append(
                f"<figure>{svg}<figcaption>{_e(y_label)} against energy</figcaption></figure>"
            )
    if plots:
        n_front = sum(1 for p in points if p.get("pareto"))
        out.append(
            "<h2>Pareto front</h2>"
            f'<p class="muted">{len(points)} policies evaluated, {n_front} on the multi-objective '
            "front (green); the line is the front in each plot's two axes; squares are the "
            "baselines.</p>"
            f'<div class="plots">{"".join(plots)}</div>'
        )

    if baselines:
        rows = [
            [
                (_e(b.get("name", "")), None),
                (_fmt(b.get("accuracy")), b.get("accuracy")),
                (_fmt(b.get("latency_ms"), "ms"), b.get("latency_ms")),
                (_fmt(b.get("size_bytes"), "B"), b.get("size_bytes")),
                (_energy(b.get("energy_mj"), b.get("energy_kind")), b.get("energy_mj")),
                (_e(b.get("note", "")), None),
            ]
            for b in baselines
        ]
        out.append(
            "<h2>Baselines</h2>"
            + _table(["model", "accuracy", "latency", "size", "energy", "note"], rows)
        )

    if points:
        shown = sorted(points, key=lambda p: (not p.get("pareto"), str(p.get("id"))))[:200]
        rows = [
            [
                (_e(p.get("id", "")), None),
                (_fmt(p.get("pareto")), None),
                (_fmt(p.get("accuracy")), p.get("accuracy")),
                (_fmt(p.get("latency_ms"), "ms"), p.get("latency_ms")),
                (_fmt(p.get("size_bytes"), "B"), p.get("size_bytes")),
                (_energy(p.get("energy_mj"), p.get("energy_kind")), p.get("energy_mj")),
                (_e(p.get("status", "ok")), None),
                (_e(p.get("policy", "")), None),
            ]
            for p in shown
        ]
        more = f" (first 200 of {len(points)})" if len(points) > 200 else ""
        out.append(
            f"<h2>Policies{more}</h2>"
            + _table(
                ["id", "front", "accuracy", "latency", "size", "energy", "status", "policy"], rows
            )
        )

    if data.get("layers"):
        rows = [
            [
                (_e(r.get("layer", "")), None),
                (_e(r.get("op", "")), None),
                (_e(r.get("decision", "")), None),
                (_fmt(r.get("sensitivity")), r.get("sensitivity")),
            ]
            for r in data["layers"]
        ]
        out.append(
            "<h2>Per-layer decisions</h2>"
            '<p class="muted">sensitivity: drop of the metric when only that layer is '
            "compressed (higher is more sensitive).</p>"
            + _table(["layer", "op", "decision", "sensitivity"], rows)
        )

    if data.get("stages"):
        rows = [
            [
                (_e(s.get("stage", "")), None),
                (_e(s.get("status", "")), None),
                (_fmt(s.get("seconds"), "s"), s.get("seconds")),
                (_e(s.get("detail", "")), None),
            ]
            for s in data["stages"]
        ]
        out.append("<h2>Stages</h2>" + _table(["stage", "status", "time", "detail"], rows))

    if data.get("passes"):
        rows = [
            [(_e(p.get("pass", "")), None), (_fmt(p.get("time_s"), "s"), p.get("time_s"))]
            for p in data["passes"]
        ]
        out.append("<h2>Pass timings</h2>" + _table(["pass", "time"], rows))

    if data.get("notes"):
        items = "".join(f"<li>{_e(n)}</li>" for n in data["notes"])
        out.append(f"<h2>Notes</h2><ul>{items}</ul>")

    out.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(out)


def write_report(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Render ``data`` and write it atomically to ``path``."""
    with atomic_write(path, "w") as f:
        f.write(render_report(data))
