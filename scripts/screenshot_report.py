"""Render a `neuralode report` page in headless Chromium: a full-page PNG and the layout numbers.

    python scripts/screenshot_report.py REPORT.html OUT.png [--width 1280]

Prints the page's width as laid out (``scrollWidth``; wider than the window means something is
cut off at the right edge), its height and every figure's rendered width, then writes the
screenshot. Look at the picture before calling a report layout done. Needs a Chromium binary
(Debian: ``apt-get install -y chromium``); ``tests/test_cli_report.py`` uses the same functions.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["chromium", "layout", "screenshot"]

_PROBE = """<script>window.addEventListener('load',function(){
var d=document.documentElement, imgs=[].slice.call(document.querySelectorAll('figure img'));
var tables=[].slice.call(document.querySelectorAll('table')).map(function(t){return t.getBoundingClientRect().right;});
var out={scroll_width:d.scrollWidth, client_width:d.clientWidth,
  height:d.scrollHeight, figure_widths:imgs.map(function(i){return Math.round(i.getBoundingClientRect().width);}),
  widest_table_right:Math.round(Math.max.apply(null,[0].concat(tables))), zoomed:false, zoom_width:0};
if(imgs.length){imgs[0].click(); var z=document.getElementById('zoom'), zi=z&&z.querySelector('img');
  out.zoomed=!!(z&&z.classList.contains('on')); out.zoom_width=zi?Math.round(zi.getBoundingClientRect().width):0;
  document.dispatchEvent(new KeyboardEvent('keydown',{key:'Escape'}));}
document.body.setAttribute('data-layout', JSON.stringify(out));});</script>"""


def chromium() -> str | None:
    """The Chromium (or Chrome) binary on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise RuntimeError("no chromium on PATH; install it (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def layout(page: Path, width: int = 1280) -> dict:
    """Lay ``page`` out in a ``width``-pixel window; return scroll_width, client_width, height,
    figure_widths and widest_table_right (CSS pixels), and whether a click on the first figure
    opened it (``zoomed``) and how wide (``zoom_width``)."""
    page = Path(page).resolve()
    probe = page.with_name(f".{page.stem}.probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    try:
        done = _run([f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()])
    finally:
        probe.unlink(missing_ok=True)
    match = re.search(r"data-layout=\"([^\"]*)\"", done.stdout)
    if match is None:
        raise RuntimeError(f"chromium printed no layout (exit {done.returncode}): {done.stderr[-500:]}")
    return json.loads(match.group(1).replace("&quot;", '"'))


def screenshot(page: Path, out: Path, width: int = 1280, height: int | None = None) -> Path:
    """Write a PNG of ``page`` at ``width`` pixels; ``height`` defaults to the whole page (at most 20,000)."""
    page, out = Path(page).resolve(), Path(out).resolve()
    if height is None:
        height = min(20_000, int(layout(page, width)["height"]) + 20)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _run([f"--window-size={width},{height}", "--virtual-time-budget=5000", f"--screenshot={out}", page.as_uri()])
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args(argv)
    numbers = layout(args.page, args.width)
    print(json.dumps(numbers))
    if numbers["scroll_width"] > numbers["client_width"]:
        print(f"warning: the page is {numbers['scroll_width']} px wide in a {args.width} px window; "
              f"content is cut off at the right", file=sys.stderr)
    print(screenshot(args.page, args.out, args.width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
