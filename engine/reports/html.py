"""HTML building blocks of the report: one self-contained page, every value escaped.

The page carries its own CSS and its images as ``data:image/png;base64`` URIs; it loads
nothing from anywhere, so it opens offline and can be mailed or archived as one file.
All text from data (ids, messages, URIs, names) goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.header { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dl.header dt { font-weight: 600; } dl.header dd { margin: 0; font-variant-numeric: tabular-nums; }
.note { color: #555; font-size: 0.85rem; } .warn { color: #a33; }
figure { margin: 1rem 0; } figcaption { font-size: 0.85rem; color: #555; }
.overlays { display: flex; flex-wrap: wrap; gap: 1rem; } .overlays figure { max-width: 560px; }
img { max-width: 100%; height: auto; } div.scroll { overflow-x: auto; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A cell's text: integers as they are, floats in plain digits (never scientific
    notation: a reader compares columns digit by digit) rounded to `digits` significant
    digits but keeping every digit left of the point (36000.0 -> "36000", 9999.6 ->
    "10000", 0.000355 -> "0.000355"), missing values as an en dash, datetimes in ISO form
    (UTC), lists joined."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return plain_number(float(value), digits)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(fmt(v, digits) for v in value)
    return str(value)


def plain_number(v: float, digits: int = 4) -> str:
    """`v` in plain decimal digits, `digits` significant ones (all of its integer part)."""
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    text = f"{v:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def duration(seconds: Any) -> str:
    """Seconds as h:mm:ss (36000 -> "10:00:00"); an en dash when not a finite number."""
    if not isinstance(seconds, (int, float, np.integer, np.floating)) or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = int(round(float(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def table(df: pd.DataFrame, *, index: bool = True, table_id: str | None = None, limit: int | None = None) -> str:
    """A DataFrame as an HTML table (header from its columns; the index first when
    `index`), numbers right-aligned. limit: rows shown; a note says how many were left."""
    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    shown = df if limit is None else df.iloc[:limit]
    body = []
    for idx, row in zip(shown.index, shown.itertuples(index=False, name=None)):
        cells = ([idx] if index else []) + list(row)
        body.append("<tr>" + "".join(
            f'<td class="num">{esc(fmt(v))}</td>' if _is_num(v) else f"<td>{esc(fmt(v))}</td>" for v in cells) + "</tr>")
    attr = f' id="{esc(table_id)}"' if table_id else ""
    more = "" if limit is None or len(df) <= limit else \
        f'<p class="note">{len(df) - limit} more rows not shown ({len(df)} in all).</p>'
    return (f'<div class="scroll"><table{attr}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            f"</table></div>{more}")


def definitions(items: Iterable[tuple[str, Any]], *, dl_id: str | None = None) -> str:
    """Name/value pairs as a definition list (the run header)."""
    attr = f' id="{esc(dl_id)}"' if dl_id else ""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(fmt(v))}</dd>" for k, v in items)
    return f'<dl class="header"{attr}>{rows}</dl>'


def image(png: bytes, alt: str, caption: str = "") -> str:
    """A figure with the PNG inline."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def note(text: str, *, warn: bool = False) -> str:
    return f'<p class="note{" warn" if warn else ""}">{esc(text)}</p>'


def section(section_id: str, title: str, parts: Sequence[str]) -> str:
    return f'<section id="{esc(section_id)}"><h2>{esc(title)}</h2>{"".join(parts)}</section>'


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"note\">{esc(subtitle)}</p>{''.join(sections)}</body></html>\n")


__all__ = ["definitions", "duration", "esc", "fmt", "image", "note", "page", "plain_number", "section", "table"]
