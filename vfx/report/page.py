"""The report's HTML: one self-contained page (inline style, script and plots; videos and images by
relative paths from the report folder)."""

from __future__ import annotations

import os
from fractions import Fraction
from html import escape
from pathlib import Path
from urllib.parse import quote

from vfx.report.collect import Page
from vfx.report.static import CSP, CSS, JS
from vfx.report.svg import line_plot
from vfx.status import key_params


def relative_url(path: Path, folder: Path) -> str:
    """`path` as a URL relative to the report folder."""
    return quote(os.path.relpath(path, folder))


def _code(text: str) -> str:
    return f"<code>{escape(text)}</code>"


def _videos(page: Page, folder: Path) -> str:
    if not page.videos:
        return '<p class="todo">No frames yet: run the commands under <a href="#next">Next steps</a>.</p>'
    out = ['<div class="controls"><button id="play" type="button">Play</button>',
           f'<input id="scrub" type="range" min="0" max="{max(page.frames - 1, 0)}" value="0" step="1" '
           'aria-label="frame">', '<span id="frame">frame 0</span></div>', '<div class="videos">']
    for video in page.videos:
        out.append(f'<figure><video class="sync" src="{escape(relative_url(video.path, folder))}" preload="auto" muted '
                   f'playsinline data-frames="{video.frames}" data-fps="{escape(video.fps)}"></video>'
                   f'<figcaption><b>{escape(video.label)}</b>: {escape(video.note)}<br>{_code(video.command)}'
                   '</figcaption></figure>')
    out.append("</div>")
    if not page.decoded:
        out.append(f'<p class="todo">Nothing decoded yet: run {_code(f"vfx decode {page.root}")} (and the commands '
                   'under <a href="#next">Next steps</a>).</p>')
    return "\n".join(out)


def _sheets(page: Page, sheets: dict[str, tuple[str, list[int]]]) -> str:
    if not sheets:
        return "<p>No decoded edit yet.</p>"
    out = ['<div class="sheets">']
    rows = "source (top), the inversion's reconstruction, " if page.reconstructed else "source (top), "
    for name, (file, indices) in sheets.items():
        out.append(f'<figure><img src="{escape(quote(file))}" alt="contact sheet of {escape(name)}">'
                   f'<figcaption>frames {", ".join(map(str, indices))}: {rows}{escape(name)} (bottom)'
                   '</figcaption></figure>')
    out.append("</div>")
    return "\n".join(out)


def _metrics(page: Page) -> str:
    if not page.evaluations:
        return (f"<p>No evaluation yet: run {_code(f'vfx eval {page.root} --edit NAME')} "
                f"(or {_code(f'vfx eval {page.root} --inversion')}).</p>")
    out = []
    for item in page.evaluations:
        state = "" if item.state == "complete" else f" ({escape(item.state)})"
        out.append(f"<h3>eval {escape(item.name)}{state}</h3><p>{_code(item.command)}</p>")
        if item.means:
            out.append("<table><tr>" + "".join(f"<th>{escape(label)}</th>" for label, _ in item.means) + "</tr><tr>"
                       + "".join(f"<td>{escape(value)}</td>" for _, value in item.means) + "</tr></table>")
        out.append('<div class="plots">' + "".join(line_plot(title, series) for title, series in item.panels) + "</div>")
    return "\n".join(out)


def _next(page: Page) -> str:
    if not page.next_steps:
        return "<p>Every stage is complete.</p>"
    return "<ol>" + "".join(f"<li>{_code(step)}</li>" for step in page.next_steps) + "</ol>"


def _time(row: dict) -> str:
    return f"{row['seconds']:.1f} s" if row.get("seconds") is not None else ""


def _stages(page: Page) -> str:
    out = ["<table><tr><th>folder</th><th>stage</th><th>name</th><th>state</th><th>units</th><th>parameters</th>"
           "<th>time</th><th>finished</th><th>artifacts</th><th>command</th></tr>"]
    for row in page.rows:
        units = f"{row['done']}/{row['units']}" if row.get("units") else ""
        artifacts = "<br>".join(escape(key) for key in row["artifact_keys"])
        out.append(f"<tr><td>{escape(row['folder'])}</td><td>{escape(row['stage'])}</td><td>{escape(row['name'] or '')}"
                   f"</td><td class=\"{escape(row['state'])}\">{escape(row['state'])}</td><td>{units}</td>"
                   f"<td>{escape(key_params(row.get('params') or {}, limit=400))}</td><td>{_time(row)}</td>"
                   f"<td>{escape(row.get('finished') or '')}</td><td>{artifacts}</td>"
                   f"<td>{_code(row['command']) if row['command'] else ''}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def render(page: Page, folder: Path, sheets: dict[str, tuple[str, list[int]]]) -> str:
    """The page for a report written into `folder`; `sheets`: edit name -> (PNG file name, frame indices)."""
    fps = float(Fraction(page.fps)) if page.fps else 0.0
    title = f"vfx report: {page.root.name}"
    sections = [("videos", "Videos", _videos(page, folder)), ("sheets", "Contact sheets", _sheets(page, sheets)),
                ("metrics", "Per-frame metrics", _metrics(page)), ("next", "Next steps", _next(page)),
                ("stages", "Stages", _stages(page))]
    body = "\n".join(f'<section id="{key}"><h2>{heading}</h2>\n{content}\n</section>' for key, heading, content in sections)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{CSS}</style>
</head>
<body data-frames="{page.frames}" data-fps="{fps!r}">
<h1>{escape(title)}</h1>
<p>{_code(str(page.root))}</p>
{body}
<script>{JS}</script>
</body>
</html>
"""
