"""One self-contained HTML page: a JSON document and the small scripts that draw it.

`nanotrain plan --html` and `nanotrain report` write pages that work offline from file://: no CDN,
no request of any kind. The scripts and the style sheet live beside this file (html/*.js,
html/page.css), are read at write time and inlined; the data is inlined as JSON in
<script type="application/json" id="data">, which the scripts parse and draw (they compute no
model of their own: every number on the page is in that JSON).

    html/common.js   number formats, the stacked bar, the pipeline timeline (F, B, W, idle)
    html/plan.js     the plan page: candidates table, filters, the selected layout's panel
    html/report.js   the run report's predicted-vs-measured step and its measured timeline
"""

from __future__ import annotations

import html
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "html"
# Where the hover explanations link: a source checkout's docs/planning.md, else its name.
DOCS = Path(__file__).resolve().parents[3] / "docs" / "planning.md"
DOCS_NAME = DOCS.as_uri() if DOCS.exists() else "docs/planning.md"


def asset(name: str) -> str:
    return (ASSETS / name).read_text()


def embed_json(text: str) -> str:
    """JSON as the content of a <script> element: "</" would end the element early."""
    return text.replace("</", "<\\/")


def render_page(title: str, script: str, data_json: str, body: str = "") -> str:
    """The page: the style sheet, `body` (static HTML written by the caller), the data, and
    common.js followed by html/{script}.js."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>{asset('page.css')}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n"
            f'<script type="application/json" id="data">{embed_json(data_json)}</script>\n'
            f"<script>{asset('common.js')}\n{asset(script + '.js')}</script>\n</body></html>\n")


def write_page(path: Path, title: str, script: str, data_json: str, body: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(title, script, data_json, body))
    return path
