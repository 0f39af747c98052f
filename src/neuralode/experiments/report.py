"""``neuralode report``: one self-contained HTML page for one or more run directories.

The page holds a table of every run's final metrics side by side (with the seed
documents' reference figures in their own column where an experiment defines them), each
run's config, and its PNG plots embedded as base64 (no files beside the page needed).
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path

__all__ = ["ReportError", "write_report"]


class ReportError(ValueError):
    """A directory that cannot be reported on (the message says why)."""


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;font-variant-numeric:tabular-nums}
th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}
td.ref{background:#fff8e0}
.plots{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}figcaption{font-size:.85em;color:#555}
img{max-width:560px;border:1px solid #eee}
details{margin:.5em 0}
"""


def _load_run(run_dir: Path) -> dict:
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ReportError(f"{run_dir} is not a run directory (no config.json); "
                          f"pass directories written by `neuralode run`")
    run = {"dir": run_dir, "config": json.loads(config_file.read_text())}
    summary_file = run_dir / "summary.json"
    run["summary"] = json.loads(summary_file.read_text()) if summary_file.is_file() else {
        "status": "unfinished (no summary.json)", "metrics": {}, "references": {}}
    run["plots"] = sorted((run_dir / "plots").glob("*.png"), key=lambda p: (p.stem != "loss", p.stem))
    return run


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(path.name)}</figcaption></figure>")


def _label(run: dict) -> str:
    name = run["config"].get("experiment", "?")
    variant = run["config"].get("config", {}).get("variant")
    if variant:
        name += f" ({variant})"
    return f"{html.escape(run['dir'].name)}<br><small>{html.escape(name)}</small>"


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write the HTML report for ``run_dirs`` to ``out`` and return ``out``."""
    runs = [_load_run(Path(d)) for d in run_dirs]
    e = html.escape

    metric_names: list[str] = []
    references: dict[str, dict] = {}
    for run in runs:
        for name in run["summary"].get("metrics", {}):
            if name not in metric_names:
                metric_names.append(name)
        references.update(run["summary"].get("references", {}))
    for name in references:
        if name not in metric_names:
            metric_names.append(name)

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>neuralode report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>neuralode report</h1>",
             f"<p>{len(runs)} run(s); written {e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>",
             "<h2>Metrics</h2><table><tr><th>metric</th>"]
    parts += [f"<th>{_label(r)}</th>" for r in runs]
    if references:
        parts.append("<th>seed document</th>")
    parts.append("</tr>")
    rows = [("status", lambda r: r["summary"].get("status")),
            ("steps", lambda r: r["summary"].get("steps")),
            ("wall time [s]", lambda r: r["summary"].get("wall_time_s")),
            ("seed", lambda r: r["config"].get("config", {}).get("seed"))]
    for title, get in rows:
        parts.append(f"<tr><td>{e(title)}</td>" + "".join(f"<td>{e(_fmt(get(r)))}</td>" for r in runs)
                     + ("<td></td>" if references else "") + "</tr>")
    for name in metric_names:
        ref = references.get(name)
        cells = "".join(f"<td>{e(_fmt(r['summary'].get('metrics', {}).get(name)))}</td>" for r in runs)
        ref_cell = ""
        if references:
            ref_cell = (f"<td class='ref' title='{e(ref['label'])} ({e(ref['source'])})'>"
                        f"{e(_fmt(ref['value']))}</td>") if ref else "<td></td>"
        parts.append(f"<tr><td>{e(name)}</td>{cells}{ref_cell}</tr>")
    parts.append("</table>")
    if references:
        parts.append("<p>Seed-document figures: " + "; ".join(
            f"<b>{e(k)}</b> = {e(_fmt(r['value']))} ({e(r['label'])})" for k, r in references.items())
            + ".</p>")

    for run in runs:
        cfg = run["config"].get("config", {})
        parts.append(f"<h2>{e(str(run['dir']))}</h2>")
        parts.append("<details><summary>config</summary><table>"
                     + "".join(f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>" for k, v in cfg.items())
                     + "</table></details>")
        if run["plots"]:
            parts.append("<div class='plots'>" + "".join(_img(p) for p in run["plots"]) + "</div>")
        else:
            parts.append("<p>(no plots)</p>")
    parts.append("</body></html>\n")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
