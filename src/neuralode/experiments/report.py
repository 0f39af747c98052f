"""``neuralode report``: one self-contained HTML page for one or more run directories.

Layout (checked in headless Chromium by ``scripts/screenshot_report.py`` and
``tests/test_cli_report.py``): an overview of the runs (one row each: experiment, status,
steps, wall time, device), then one section per run with

* a three-column table, *metric | ours | seed paper*, of the run's scalar metrics, with the seed
  document's figure (and its source on hover and in a footnote) beside ours where the experiment
  defines one;
* per-class metrics (lists of one number per class) as one small table, classes as columns;
* confusion matrices as grids (rows: true class, columns: prediction), shaded by the fraction of
  the true class, so the diagonal reads at a glance;
* the run's figures, full width, each opening at full resolution on click;
* the config, folded.

Everything is inline (PNG as base64, CSS, a few lines of JS for the zoom): the file can be mailed.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import time
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "write_report"]


class ReportError(ValueError):
    """A directory that cannot be reported on (the message says why)."""


_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;padding:1.5em 2em;max-width:1100px;
     color:#1d2330;line-height:1.4}
h1{margin:.2em 0}h2{margin:2em 0 .3em;padding-top:.6em;border-top:2px solid #dfe3ea}
h3{margin:1.4em 0 .4em;font-size:1.05em;color:#3b4456}
.meta{color:#5b6475;font-size:.92em;margin:.2em 0 1em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.92em;max-width:100%}
th,td{border:1px solid #d5d9e0;padding:.3em .65em;text-align:right;font-variant-numeric:tabular-nums}
th{background:#f2f4f7;font-weight:600}
th:first-child,td:first-child{text-align:left}
td.name{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;word-break:break-word}
td.ref{background:#fff6dc}
td.na{color:#9aa2b1}
.scroll{overflow-x:auto;max-width:100%}
.grids{display:flex;flex-wrap:wrap;gap:1.5em}
table.grid td{min-width:3.2em;text-align:center}
table.grid th{text-align:center}
table.grid caption{caption-side:top;text-align:left;font-weight:600;padding-bottom:.3em}
figure{margin:1em 0 1.6em}
figure img{display:block;max-width:100%;height:auto;border:1px solid #e3e6eb;cursor:zoom-in;background:#fff}
figcaption{font-size:.85em;color:#5b6475;margin-top:.3em}
details{margin:.6em 0}summary{cursor:pointer;color:#3b4456}
.notes{font-size:.85em;color:#5b6475}
#zoom{display:none;position:fixed;inset:0;background:rgba(20,24,32,.92);overflow:auto;cursor:zoom-out;z-index:9}
#zoom.on{display:block}
#zoom img{display:block;margin:2vh auto;width:auto;min-width:min(96vw,1600px);max-width:none;background:#fff}
"""

_JS = """
document.addEventListener('click',function(e){
  var z=document.getElementById('zoom');
  if(e.target.closest('#zoom')){z.classList.remove('on');z.innerHTML='';return;}
  if(e.target.matches('figure img')){
    var i=new Image();i.src=e.target.src;i.alt=e.target.alt;z.innerHTML='';z.appendChild(i);z.classList.add('on');}
});
document.addEventListener('keydown',function(e){if(e.key==='Escape'){var z=document.getElementById('zoom');
  z.classList.remove('on');z.innerHTML='';}});
"""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ReportError(f"{path} is not valid JSON (truncated or edited?); restore it or leave "
                          f"that run out of the report") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return "an array" if isinstance(value, list) else "an object"


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_shape(path: Path, data: Any, kind: str) -> None:
    """ReportError naming ``path`` unless ``data`` has the shape ``neuralode run`` writes: valid JSON of
    the wrong shape (an edited or foreign file) must not crash the report half-way."""

    def bad(why: str) -> ReportError:
        return ReportError(f"{path} is not a {kind} ({why}); restore it or leave that run out of the report")

    if not isinstance(data, dict):
        raise bad(f"expected an object, got {_json_type(data)}")
    if kind == "run config":
        if not isinstance(data.get("experiment"), str):
            raise bad(f"experiment: expected a name, got {_json_type(data.get('experiment'))}")
        if not isinstance(data.get("config"), dict):
            raise bad(f"config: expected an object, got {_json_type(data.get('config'))}")
        return
    for key in ("status", "device", "experiment"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise bad(f"{key}: expected a string, got {_json_type(data[key])}")
    for key in ("steps", "steps_done", "epochs", "seed", "threads", "wall_time_s"):
        if not _number(data.get(key)):
            raise bad(f"{key}: expected a number, got {_json_type(data[key])}")
    for key in ("metrics", "references"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise bad(f"{key}: expected an object, got {_json_type(data[key])}")
    for name, ref in (data.get("references") or {}).items():
        if not isinstance(ref, dict) or not _number(ref.get("value")):
            raise bad(f"references.{name}: expected an object with a numeric value, got {_json_type(ref)}")
        for key in ("label", "source"):
            if ref.get(key) is not None and not isinstance(ref[key], str):
                raise bad(f"references.{name}.{key}: expected a string, got {_json_type(ref[key])}")


def _load_run(run_dir: Path) -> dict:
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ReportError(f"{run_dir} is not a run directory (no config.json); "
                          f"pass directories written by `neuralode run`")
    run = {"dir": run_dir, "config": _read_json(config_file)}
    _check_shape(config_file, run["config"], "run config")
    summary_file = run_dir / "summary.json"
    run["summary"] = _read_json(summary_file) if summary_file.is_file() else {
        "status": "unfinished (no summary.json)", "metrics": {}, "references": {}}
    _check_shape(summary_file, run["summary"], "run summary")
    plots = sorted((run_dir / "plots").glob("*.png"), key=lambda p: (p.stem == "loss", p.stem))
    if not _experiment_attr(run["config"].get("experiment"), "loss_plot", True):
        plots = [p for p in plots if p.stem != "loss"]  # drawn by an older version: no curve
    run["plots"] = plots
    return run


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool))


def _is_matrix(v: Any) -> bool:
    return (isinstance(v, list) and len(v) > 1 and all(isinstance(r, list) and len(r) == len(v) for r in v)
            and all(_is_number(x) for r in v for x in r))


def _experiment_attr(experiment: Any, attr: str, default: Any) -> Any:
    try:
        from . import get_experiment

        return getattr(get_experiment(str(experiment)), attr, default)
    except ValueError:  # an unknown or renamed experiment
        return default


def _class_names(experiment: str, n: int) -> list[str]:
    names = list(_experiment_attr(experiment, "class_names", ()) or ())
    return names if len(names) == n else [str(i) for i in range(n)]


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    e = html.escape
    return (f'<figure><img alt="{e(path.stem)}" loading="lazy" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(path.name)}: click to open at full size</figcaption></figure>")


def _grid(title: str, matrix: list[list[Any]], names: list[str]) -> str:
    e = html.escape
    out = [f"<table class='grid'><caption>{e(title)}</caption><tr><th>true \\ predicted</th>"]
    out += [f"<th>{e(n)}</th>" for n in names]
    out.append("</tr>")
    for name, row in zip(names, matrix):
        row = [x if x is not None and math.isfinite(x) else None for x in row]  # NaN (older files): no shade
        total = sum(x for x in row if x) or 1
        out.append(f"<tr><th>{e(name)}</th>")
        for x in row:
            share = (x or 0) / total
            # white to blue by the share of the true class; text turns white on dark cells
            shade = f"rgb({int(255 - 205 * share)},{int(255 - 150 * share)},{int(255 - 40 * share)})"
            color = "#fff" if share > 0.55 else "#1d2330"
            out.append(f"<td style='background:{shade};color:{color}' title='{share:.1%} of true {e(name)}'>"
                       f"{e(_fmt(x))}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _section(run: dict, index: int) -> str:
    e = html.escape
    summary, cfg = run["summary"], run["config"]
    experiment = cfg.get("experiment", "?")
    metrics: dict = summary.get("metrics", {}) or {}
    references: dict = summary.get("references", {}) or {}
    label = "" if run["dir"].name == experiment else f" <small>({e(run['dir'].name)})</small>"
    parts = [f"<h2 id='run{index}'>{e(experiment)}{label}</h2>"]
    config = cfg.get("config", {})
    facts = [f"status <b>{e(str(summary.get('status')))}</b>"]
    if summary.get("steps") is not None:
        facts.append(f"{e(_fmt(summary.get('steps')))} steps")
    if summary.get("wall_time_s") is not None:
        facts.append(f"{summary['wall_time_s']:.1f} s")
    if summary.get("device"):
        facts.append(f"on {e(summary['device'])}")
    if config.get("seed") is not None:
        facts.append(f"seed {e(str(config.get('seed')))}")
    if config.get("variant"):
        facts.append(f"variant {e(str(config['variant']))}")
    parts.append(f"<p class='meta'>{' · '.join(facts)} · <code>{e(str(run['dir']))}</code></p>")

    classes = list(_experiment_attr(experiment, "class_names", ()) or ())
    scalars, per_class, series, matrices, other = [], [], [], [], []
    for name, value in metrics.items():
        numeric_list = isinstance(value, list) and value and all(_is_number(v) for v in value)
        if _is_number(value):
            scalars.append(name)
        elif _is_matrix(value):
            matrices.append(name)
        elif numeric_list and len(value) == len(classes):
            per_class.append(name)
        elif numeric_list and len(value) <= 12:
            series.append(name)
        else:
            other.append(name)
    for name in references:  # a seed figure without ours still gets its row
        if name not in metrics:
            scalars.append(name)

    if scalars:
        parts.append("<div class='scroll'><table><tr><th>metric</th><th>ours</th><th>seed paper</th></tr>")
        for name in scalars:
            ref = references.get(name)
            ours = metrics.get(name)
            ref_cell = (f"<td class='ref' title='{e(ref.get('label', ''))} ({e(ref.get('source', ''))})'>"
                        f"{e(_fmt(ref.get('value')))}</td>") if ref else "<td class='na'>–</td>"
            parts.append(f"<tr><td class='name'>{e(name)}</td><td>{e(_fmt(ours))}</td>{ref_cell}</tr>")
        parts.append("</table></div>")
        sources = sorted({r.get("source", "") for r in references.values() if r})
        if sources:
            parts.append(f"<p class='notes'>Seed figures from {e('; '.join(sources))} "
                         f"(hover a figure for what it measures).</p>")

    for title, keys, header in (("Per class", per_class, classes),
                                ("Series (one value per epoch or setting)", series,
                                 [str(i + 1) for i in range(max((len(metrics[k]) for k in series), default=0))])):
        if not keys:
            continue
        parts.append(f"<h3>{e(title)}</h3><div class='scroll'><table><tr><th>metric</th>"
                     + "".join(f"<th>{e(c)}</th>" for c in header) + "</tr>")
        for key in keys:
            cells = list(metrics[key]) + [""] * (len(header) - len(metrics[key]))
            parts.append(f"<tr><td class='name'>{e(key)}</td>"
                         + "".join(f"<td>{e(_fmt(v)) if v != '' else ''}</td>" for v in cells) + "</tr>")
        parts.append("</table></div>")

    if matrices:
        seed = _experiment_attr(experiment, "seed_confusion", {}) or {}
        parts.append("<h3>Confusion matrices</h3><p class='notes'>Rows: true class; columns: prediction; "
                     "counts, shaded by the fraction of the true class; the seed paper's beside ours "
                     "where it gives one.</p><div class='grids'>")
        for key in matrices:
            names = _class_names(experiment, len(metrics[key]))
            parts.append(_grid(f"{key} (ours)", metrics[key], names))
            member = key[: -len("_confusion")] if key.endswith("_confusion") else key
            if member in seed and _is_matrix(seed[member]) and len(seed[member]) == len(names):
                parts.append(_grid(f"{member} (seed paper)", seed[member], names))
        parts.append("</div>")

    if other:
        parts.append("<details><summary>other results</summary><table>"
                     + "".join(f"<tr><td class='name'>{e(k)}</td><td style='text-align:left'>"
                               f"{e(_fmt(metrics[k]))}</td></tr>" for k in other)
                     + "</table></details>")

    if run["plots"]:
        parts.append("<h3>Figures</h3>" + "".join(_img(p) for p in run["plots"]))
    else:
        parts.append("<p class='notes'>(no figures)</p>")
    parts.append("<details><summary>config</summary><table>"
                 + "".join(f"<tr><td class='name'>{e(k)}</td><td style='text-align:left'>{e(_fmt(v))}</td></tr>"
                           for k, v in config.items())
                 + "</table></details>")
    return "\n".join(parts)


_HTML = (".html", ".htm")


def _check_out(run_dirs: list[Path], out: Path) -> None:
    """Refuse an ``out`` that would replace a file the report did not write: one of a run directory's
    own files (``config.json``, ``summary.json``, a checkpoint, a plot, ...: anything in a run
    directory but an HTML page) or any existing file that is not an HTML page."""
    where = out.resolve()
    for run_dir in run_dirs:
        run = Path(run_dir).resolve()
        if where.is_relative_to(run) and where.suffix.lower() not in _HTML:
            raise ReportError(f"--out {out} is inside the run directory {run_dir} and is not an .html file: the report "
                              f"would replace that run's own files; name an .html file (default: "
                              f"{Path(run_dir) / 'report.html'})")
    if where.is_file() and where.suffix.lower() not in _HTML:
        raise ReportError(f"--out {out} is an existing file that is not an .html page; the report is not written "
                          f"over it: name an .html file (or delete that file first)")


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write the HTML report for ``run_dirs`` to ``out`` (atomically) and return ``out``.

    Raises
    ------
    ReportError
        ``out`` is a file of a run directory other than an HTML page, or an existing file that is not
        an HTML page (it is never overwritten), or a run directory cannot be reported on.
    """
    _check_out([Path(d) for d in run_dirs], Path(out))
    runs = [_load_run(Path(d)) for d in run_dirs]
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>neuralode report</title><style>{_CSS}</style></head><body>",
             "<h1>neuralode report</h1>",
             f"<p class='meta'>{len(runs)} run(s); written {e(time.strftime('%Y-%m-%d %H:%M:%S'))}. "
             f"Each run has its own section: its metrics beside the seed papers' figures, then its figures "
             f"(click one to enlarge).</p>",
             "<div class='scroll'><table><tr><th>run</th><th>experiment</th><th>status</th><th>steps</th>"
             "<th>wall time [s]</th><th>device</th></tr>"]
    for i, run in enumerate(runs):
        s = run["summary"]
        wall = s.get("wall_time_s")
        parts.append(f"<tr><td><a href='#run{i}'>{e(run['dir'].name)}</a></td>"
                     f"<td style='text-align:left'>{e(run['config'].get('experiment', '?'))}</td>"
                     f"<td style='text-align:left'>{e(str(s.get('status')))}</td><td>{e(_fmt(s.get('steps')))}</td>"
                     f"<td>{'–' if wall is None else f'{wall:.1f}'}</td>"
                     f"<td style='text-align:left'>{e(str(s.get('device', '–')))}</td></tr>")
    parts.append("</table></div>")
    parts += [_section(run, i) for i, run in enumerate(runs)]
    parts.append(f"<div id='zoom' title='click or Esc to close'></div><script>{_JS}</script></body></html>\n")

    from .runner import _atomic_write_bytes

    out = Path(out)
    _atomic_write_bytes(out, "\n".join(parts).encode("utf-8"))
    return out
