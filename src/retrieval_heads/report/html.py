"""Render report blocks as one self-contained HTML page: inline CSS, figures as base64 data URIs.

The page fetches nothing: its Content-Security-Policy allows only inline styles, data: images and its
one inline script, which records on ``<body>`` how many figures decoded (``data-figures="ok/total"``), so
a headless browser can check that the page rendered.
"""

from __future__ import annotations

import base64
import html
import re

from .document import Block, Bullets, Figure, Heading, Paragraph, Raw, Table

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 0 auto; padding: 24px 32px 64px; max-width: 1300px; background: #fff; }
h1 { font-size: 26px; border-bottom: 2px solid #d0d7de; padding-bottom: 6px; }
h2 { font-size: 20px; margin-top: 36px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
h3 { font-size: 16px; margin-top: 24px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f6f8fa; text-align: center; }
td.r { text-align: right; } td.l { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
div.tbl { margin: 8px 0 16px; } div.tbl.inline { display: inline-block; vertical-align: top; margin-right: 28px; }
div.tbl table { margin: 0; }
p.caption { color: #57606a; font-style: italic; margin: 0 0 4px; }
code { background: #eff1f3; padding: 1px 4px; border-radius: 4px; font-size: 90%; }
figure { display: inline-block; margin: 8px 12px 16px 0; vertical-align: top; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 12px; max-width: 480px; }
details.fold { margin: 8px 0 16px; } details.fold > summary { cursor: pointer; color: #0969da; }
div.tbl.inline details.fold { margin: 0; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute("data-figures", ok + "/" + imgs.length);
});
"""

FOLD_ROWS = 12  # tables longer than this are folded (<details>)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def inline(text: str) -> str:
    """Escape, then turn ``**x**`` into <strong> and ```x``` into <code>."""
    out = html.escape(str(text))
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def table(t: Table) -> str:
    align = t.align or ["l"] + ["r"] * (len(t.headers) - 1)
    head = "".join(f"<th>{inline(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f'<td class="{a}">{inline(c)}</td>' for a, c in zip(align, row)) + "</tr>"
                   for row in t.rows)
    cap = f'<p class="caption">{inline(t.caption)}</p>' if t.caption else ""
    cls = "tbl inline" if t.inline else "tbl"
    grid = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if len(t.rows) > FOLD_ROWS:  # long tables start folded: the page reads top-down
        grid = f'<details class="fold"><summary>{len(t.rows)} rows (click to show)</summary>{grid}</details>'
    return f'<div class="{cls}">{cap}{grid}</div>'


def figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    width = f' width="{f.width}"' if f.width else ""
    img = f'<img src="data:image/png;base64,{data}" alt="{html.escape(f.caption)}"{width}>'
    if f.regions:  # clickable heatmaps (the explorer's script handles the clicks)
        hits = "".join(
            f'<div class="rh-hit" data-exp="{int(r["exp"])}" data-rows="{int(r["rows"])}" data-cols="{int(r["cols"])}" '
            f'style="left:{float(r["left"])}%;top:{float(r["top"])}%;width:{float(r["width"])}%;'
            f'height:{float(r["height"])}%"></div>' for r in f.regions)
        img = f'<div class="rh-hm">{img}{hits}</div>'
    return f"<figure>{img}<figcaption>{inline(f.caption)}</figcaption></figure>"


def render(title: str, blocks: list[Block]) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{inline(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            parts.append(table(b))
        elif isinstance(b, Figure):
            parts.append(figure(b))
        elif isinstance(b, Raw):
            parts.append(b.html)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n<script>{SCRIPT}</script>\n</head>\n"
        f"<body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )
