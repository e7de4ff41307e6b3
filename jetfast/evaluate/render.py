"""Writing a report: sections (heading, paragraphs, a table, images) as Markdown and as one
self-contained HTML page, and numbers as strict JSON."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import numpy as np


def json_ready(obj):
    """``obj`` with NumPy numbers and arrays as Python ones, keys as strings and NaN/inf as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None  # JSON has no NaN
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}"


def plus_minus(value, err) -> str:
    return fmt(value) if err is None or not math.isfinite(err) else f"{fmt(value)} ± {fmt(err, 2)}"


def inline_html(text: str) -> str:
    """The two bits of Markdown the report uses (**bold**, `code`) as HTML."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def render(sections: list[dict], out_dir: Path, title: str) -> tuple[str, str]:
    """Markdown and self-contained HTML of the same sections (heading, text, table, images)."""
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        md += [f"## {sec['heading']}", ""]
        body.append(f"<h2>{html.escape(sec['heading'])}</h2>")
        for para in sec.get("text", []):
            md += [para, ""]
            body.append(f"<p>{inline_html(para)}</p>")
        if sec.get("table"):
            header, rows = sec["table"]
            md.append("| " + " | ".join(header) + " |")
            md.append("|" + "|".join(" --- " for _ in header) + "|")
            md += ["| " + " | ".join(row) + " |" for row in rows]
            md.append("")
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
            body.append("</table>")
        for image in sec.get("images", []):
            if image is None:
                continue
            rel = image.relative_to(out_dir).as_posix()
            md += [f"![{image.stem}]({rel})", ""]
            data = base64.b64encode(image.read_bytes()).decode()
            body.append(f'<p><img alt="{image.stem}" src="data:image/png;base64,{data}"></p>')
    css = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
           "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return "\n".join(md) + "\n", page
