"""A ``Report`` as one self-contained HTML page: inline CSS and inline SVG charts drawn here, no
script, no font, no request to any other address, so it opens offline and from a file.

Each chart is an ``<svg class="chart" data-chart="NAME">`` whose bars are ``<rect class="bar"
data-label=... data-value=...>`` with a tooltip; the tables follow their charts. ``refresh``
adds ``<meta http-equiv="refresh">`` so a browser reloads the page while ``bms report --html
FILE --refresh N`` rewrites it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from pipeline.report.queries import DAYS, Column, Report, Section
from pipeline.report.render import describe_range, format_value, iso

__all__ = ["bar_chart", "to_html"]

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       background: #f5f6f8; color: #1f2328; }
header { background: #1f3a5f; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 6px; font-size: 22px; }
header dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0 0; }
header dt { opacity: .75; } header dd { margin: 0; }
.totals { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 14px; }
.total { background: rgba(255,255,255,.12); border-radius: 6px; padding: 8px 14px; }
.total b { display: block; font-size: 20px; }
main { padding: 8px 28px 32px; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 8px; margin: 18px 0;
          padding: 14px 20px; }
section h2 { margin: 0 0 4px; font-size: 17px; }
p.note { margin: 0 0 10px; color: #57606a; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; margin-bottom: 10px; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { display: block; max-width: 100%; height: auto; background: #fff; }
svg.chart text { font: 11px system-ui, sans-serif; fill: #57606a; }
svg.chart text.value { fill: #1f2328; }
svg.chart .grid { stroke: #eaeef2; } svg.chart .axis { stroke: #8c959f; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin: 2px 0 0; color: #57606a; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 5px; }
table.data { border-collapse: collapse; margin-top: 6px; }
table.data th, table.data td { padding: 3px 10px; border-bottom: 1px solid #eaeef2;
                               text-align: left; white-space: nowrap; }
table.data th { background: #f6f8fa; }
table.data td.num, table.data th.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
footer { color: #57606a; padding: 0 28px 24px; }
"""


def _compact(value: float) -> str:
    """An axis label: 950, 1.2k, 3.4M."""
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if value != int(value) else f"{int(value)}"


def _nice_step(maximum: float, ticks: int = 4) -> float:
    raw = maximum / ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= raw:
            return factor * power
    return 10 * power


def bar_chart(
    name: str,
    labels: Sequence[str],
    values: Sequence[float | None],
    *,
    colors: Sequence[str] | None = None,
    value_kind: str = "count",
    height: int = 240,
    slot: int = 46,
) -> str:
    """An inline SVG bar chart, one bar per label (None counts as 0); ``colors`` per bar."""
    values = [v or 0 for v in values]
    longest = min(max((len(label) for label in labels), default=1), 32)
    tilt = longest * 6.2 > slot - 4  # about 6 px a character at 11 px
    # A label tilted by 35 degrees reaches down and to the left of its bar's centre.
    left = max(52, round(longest * 5.1 - slot / 2 + 6)) if tilt else 52
    right, top = 12, 18
    bottom = round(24 + longest * 3.6) if tilt else 24
    width = left + right + max(len(labels), 1) * slot
    width = max(width, 320)
    plot_w = width - left - right
    plot_h = height - top - bottom
    parts = [
        f'<svg class="chart" data-chart="{escape(name)}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
    ]
    peak = max(values, default=0)
    if not labels or peak <= 0:
        parts.append(
            f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" '
            f'y2="{top + plot_h}"/>'
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle">'
            "no rows in this range</text></svg>"
        )
        return "".join(parts)
    step = _nice_step(peak)
    top_value = step * math.ceil(peak / step)

    def y(value: float) -> float:
        return top + plot_h - plot_h * value / top_value

    tick = 0.0
    while tick <= top_value + step / 2:
        parts.append(
            f'<line class="grid" x1="{left}" y1="{y(tick):.1f}" x2="{width - right}" '
            f'y2="{y(tick):.1f}"/><text x="{left - 6}" y="{y(tick) + 4:.1f}" '
            f'text-anchor="end">{_compact(tick)}</text>'
        )
        tick += step
    bar_w = slot * 0.68
    for index, (label, value) in enumerate(zip(labels, values, strict=True)):
        x = left + index * slot + (slot - bar_w) / 2
        color = colors[index % len(colors)] if colors else PALETTE[0]
        shown = format_value(value, _KIND[value_kind])
        parts.append(
            f'<rect class="bar" data-label="{escape(label)}" data-value="{value}" '
            f'x="{x:.1f}" y="{y(value):.1f}" width="{bar_w:.1f}" '
            f'height="{y(0) - y(value):.1f}" fill="{color}"><title>{escape(label)}: '
            f"{escape(shown)}</title></rect>"
        )
        if slot >= 30 and value:
            parts.append(
                f'<text class="value" x="{x + bar_w / 2:.1f}" y="{y(value) - 4:.1f}" '
                f'text-anchor="middle">{escape(_compact(value))}</text>'
            )
        cx, cy = x + bar_w / 2, top + plot_h + 14
        if tilt:
            parts.append(
                f'<text x="{cx:.1f}" y="{cy:.1f}" text-anchor="end" '
                f'transform="rotate(-35 {cx:.1f} {cy:.1f})">{escape(label)}</text>'
            )
        else:
            parts.append(
                f'<text x="{cx:.1f}" y="{cy:.1f}" text-anchor="middle">{escape(label)}</text>'
            )
    parts.append(
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" '
        f'y2="{top + plot_h}"/></svg>'
    )
    return "".join(parts)


_KIND = {kind: Column("", "", kind) for kind in ("count", "money", "share", "text")}


def _label(value) -> str:
    return "(none)" if value is None else str(value)


def _figure(caption: str, svg: str, legend: str = "") -> str:
    return f"<figure><figcaption>{escape(caption)}</figcaption>{svg}{legend}</figure>"


def _charts(section: Section) -> str:
    rows = section.rows
    if section.name == "categories":
        labels = [_label(r[0]) for r in rows]
        colors = PALETTE
        figures = [
            _figure(
                "Orders (distinct) by event category",
                bar_chart(
                    "categories-orders", labels, [r[1] for r in rows], colors=colors, slot=64
                ),
            ),
            _figure(
                "seat_price sum (rows) by event category",
                bar_chart(
                    "categories-revenue",
                    labels,
                    [r[3] for r in rows],
                    colors=colors,
                    value_kind="money",
                    slot=64,
                ),
            ),
        ]
    elif section.name == "payments":
        types = list(dict.fromkeys(_label(r[0]) for r in rows))
        colors = [PALETTE[types.index(_label(r[0])) % len(PALETTE)] for r in rows]
        labels = [f"{_label(r[0])} · {_label(r[1])}" for r in rows]
        legend = (
            '<div class="legend">'
            + "".join(
                f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{escape(name)}</span>'
                for i, name in enumerate(types)
            )
            + "</div>"
        )
        figures = [
            _figure(
                "Payments (distinct) by payment type · method",
                bar_chart("payments-count", labels, [r[2] for r in rows], colors=colors, slot=70),
                legend,
            ),
            _figure(
                "Average amount per payment",
                bar_chart(
                    "payments-average",
                    labels,
                    [r[4] for r in rows],
                    colors=colors,
                    value_kind="money",
                    slot=70,
                ),
                legend,
            ),
        ]
    elif section.name == "hours":
        by_hour = {r[0]: r[1] for r in rows}
        hours = list(range(24)) + ([None] if None in by_hour else [])
        figures = [
            _figure(
                "Orders (distinct) by booking hour (UTC)",
                bar_chart(
                    "hours",
                    [_label(h) for h in hours],
                    [by_hour.get(h, 0) for h in hours],
                    slot=30,
                ),
            )
        ]
    elif section.name == "days":
        by_day = {r[0]: r[1] for r in rows}
        days = list(DAYS) + [d for d in by_day if d not in DAYS]
        figures = [
            _figure(
                "Orders (distinct) by day of week",
                bar_chart("days", [_label(d)[:3] if d in DAYS else _label(d) for d in days],
                          [by_day.get(d, 0) for d in days]),
            )
        ]  # fmt: skip
    elif section.name == "retries":
        figures = [
            _figure(
                "Orders by payments per order",
                bar_chart(
                    "retries",
                    [f"{r[0]} payment{'' if r[0] == 1 else 's'}" for r in rows],
                    [r[1] for r in rows],
                    colors=[PALETTE[2] if r[0] == 1 else PALETTE[1] for r in rows],
                    slot=80,
                ),
            )
        ]
    else:
        return ""
    return f'<div class="charts">{"".join(figures)}</div>'


def _table(section: Section) -> str:
    head = "".join(
        f'<th class="{"num" if c.kind in ("count", "money", "share") else ""}">'
        f"{escape(c.heading)}</th>"
        for c in section.columns
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if c.kind in ("count", "money", "share") else ""}">'
            f"{escape(format_value(v, c))}</td>"
            for v, c in zip(row, section.columns, strict=True)
        )
        + "</tr>"
        for row in section.rows
    )
    if not section.rows:
        body = f'<tr><td colspan="{len(section.columns)}">no rows in this range</td></tr>'
    return (
        f'<div class="scroll"><table class="data" data-table="{escape(section.name)}">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _total(label: str, value: str) -> str:
    return f'<div class="total"><b>{escape(value)}</b>{escape(label)}</div>'


def to_html(report: Report, refresh: float | None = None) -> str:
    """The whole page (see the module docstring)."""
    s = report.summary
    span = (
        f"{format_value(s.first_booking_event_time, _KIND['text'])} to "
        f"{format_value(s.last_booking_event_time, _KIND['text'])} UTC"
        if s.rows
        else "no rows"
    )
    refresh_meta = (
        f'<meta http-equiv="refresh" content="{refresh:g}">' if refresh is not None else ""
    )
    refresh_note = (
        f"<dt>Live</dt><dd>this page reloads every {refresh:g} s while bms report rewrites it</dd>"
        if refresh is not None
        else ""
    )
    sections = "".join(
        f'<section id="{escape(section.name)}"><h2>{escape(section.title)}</h2>'
        f'<p class="note">{escape(section.note)}</p>{_charts(section)}{_table(section)}'
        "</section>"
        for section in report.sections
    )
    revenue = "—" if s.seat_price_sum is None else f"{s.seat_price_sum:,.2f}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{refresh_meta}
<title>bms report: {escape(report.table)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>BookMyShow bookings report</h1>
<dl>
<dt>Table</dt><dd>{escape(report.table)} in {escape(report.warehouse)}</dd>
<dt>Time range</dt><dd id="range">{escape(describe_range(report))}</dd>
<dt>Rows' booking_event_time</dt><dd>{escape(span)}</dd>
<dt>Generated</dt><dd>{escape(iso(report.generated_at) or "")}</dd>
{refresh_note}
</dl>
<div class="totals">
{_total("rows: (seat, payment) pairs", f"{s.rows:,}")}
{_total("orders: distinct order_id", f"{s.orders:,}")}
{_total("payments: distinct payment_id", f"{s.payments:,}")}
{_total("seat_price sum over rows", revenue)}
</div>
</header>
<main>
{sections}
</main>
<footer>A row is one (seat, payment) pair of bookings_fact; an order (a booking) is one order_id;
the original project's queries count rows. Made by bms report.</footer>
</body>
</html>
"""
