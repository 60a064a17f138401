"""Server-rendered SVG charts: no JavaScript, no CDN, every label escaped. Each data point carries its
values as data-* attributes, so a test (or a curious analyst) can read exactly what is drawn."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from markupsafe import Markup, escape

from pipeline.web.queries import HOUR, HourPoint

MAX_DAY_LABELS = 16
NEG = "#c0392b"
VOL = "#9fb3c8"


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:00Z")


def sparkline(points: Sequence[HourPoint], width: int = 220, height: int = 40, bucket_hours: int = 6) -> Markup:
    """Volume bars and negative-share line, in `bucket_hours` buckets so 168 hours fit in a table cell."""
    if bucket_hours == 1:  # the overview's points are already 6-hour buckets
        buckets = [(p.total, p.neg) for p in points]
    else:
        chunks = (points[i : i + bucket_hours] for i in range(0, len(points), bucket_hours))
        buckets = [(sum(p.total for p in c), sum(p.neg for p in c)) for c in chunks]
    if not buckets:
        return Markup(f'<svg class="spark" width="{width}" height="{height}" role="img" aria-label="no data"></svg>')
    n = len(buckets)
    top = max(t for t, _ in buckets) or 1
    step = width / n
    bars = []
    line = []
    for i, (total, neg) in enumerate(buckets):
        h = (height - 2) * total / top
        bars.append(
            f'<rect x="{i * step:.1f}" y="{height - h:.1f}" width="{max(step - 0.5, 0.5):.1f}" '
            f'height="{h:.1f}" fill="{VOL}"/>'
        )
        share = neg / total if total else 0.0
        line.append(f"{i * step + step / 2:.1f},{height - 1 - (height - 2) * share:.1f}")
    total_all = sum(t for t, _ in buckets)
    neg_all = sum(n_ for _, n_ in buckets)
    label = escape(f"{total_all} items, {neg_all} negative")
    return Markup(
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{label}">'
        + "".join(bars)
        + f'<polyline fill="none" stroke="{NEG}" stroke-width="1.5" points="{" ".join(line)}"/></svg>'
    )


def hourly_chart(
    points: Sequence[HourPoint],
    markers: Sequence[tuple[datetime, str, str, str]],
    selected: datetime | None,
    link: Callable[[HourPoint], str],
    step: timedelta = HOUR,
    width: int = 960,
    height: int = 260,
) -> Markup:
    """Volume per bucket (bars, left axis) and negative share (dots and line, right axis 0-100%).

    `points` are `step` buckets (hourly, or coarser for long ranges: queries.chart_step keeps them at most
    two weeks' worth of hours, so the page stays small); `markers` are (hour, severity, label, href) for alerts;
    `link(point)` is where a bar leads (an hour's headlines, or a zoom into a coarse bucket)."""
    pad_l, pad_r, pad_t, pad_b = 44, 44, 18, 28
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    n = max(len(points), 1)
    top = max((p.total for p in points), default=0) or 1
    bw = w / n
    first = points[0].start if points else None
    days = len(points) * step / timedelta(days=1)
    label_every = max(1, math.ceil(days / MAX_DAY_LABELS))
    parts = [
        f'<svg class="chart" id="hourly-chart" data-step-hours="{step // HOUR}" width="100%" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="volume and negative share">',
        f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#888"/>',
        f'<text x="{pad_l - 6}" y="{pad_t + 4}" text-anchor="end" class="ax">{top}</text>',
        f'<text x="{pad_l - 6}" y="{pad_t + h}" text-anchor="end" class="ax">0</text>',
        f'<text x="{pad_l + w + 6}" y="{pad_t + 4}" class="ax">100%</text>',
        f'<text x="{pad_l + w + 6}" y="{pad_t + h}" class="ax">0%</text>',
    ]
    # day ticks, a label on every `label_every`-th day so long ranges stay readable
    for i, p in enumerate(points):
        if p.start.hour == 0:
            x = pad_l + i * bw
            parts.append(f'<line x1="{x:.1f}" y1="{pad_t}" x2="{x:.1f}" y2="{pad_t + h}" stroke="#eee"/>')
            if p.start.toordinal() % label_every == 0:
                parts.append(f'<text x="{x + 2:.1f}" y="{height - 8}" class="ax">{p.start:%b %d}</text>')
    for i, p in enumerate(points):
        x = pad_l + i * bw
        bh = h * p.total / top
        cls = "bar sel" if selected is not None and p.start <= selected < p.start + step else "bar"
        parts.append(
            f'<a href="{escape(link(p))}"><rect class="{cls}" x="{x:.1f}" y="{pad_t + h - bh:.1f}" '
            f'width="{max(bw - 0.6, 0.6):.1f}" height="{max(bh, 0):.1f}" fill="{VOL}">'
            f"<title>{_span(p.start, step)} UTC: {p.total} items, {p.neg} negative</title></rect></a>"
        )
    # negative share: a line broken at empty buckets (no bridging), one dot per bucket with data
    segments: list[list[str]] = [[]]
    for i, p in enumerate(points):
        if p.share is None:
            if segments[-1]:
                segments.append([])
            continue
        segments[-1].append(f"{pad_l + i * bw + bw / 2:.1f},{pad_t + h - h * p.share:.1f}")
    for seg in segments:
        if len(seg) > 1:
            parts.append(f'<polyline fill="none" stroke="{NEG}" stroke-width="1.2" points="{" ".join(seg)}"/>')
    for i, p in enumerate(points):
        if p.share is None:
            continue
        parts.append(
            f'<circle class="pt" data-hour="{_iso(p.start)}" data-total="{p.total}" data-neg="{p.neg}" '
            f'cx="{pad_l + i * bw + bw / 2:.1f}" cy="{pad_t + h - h * p.share:.1f}" r="2.2" fill="{NEG}">'
            f"<title>{_span(p.start, step)} UTC: {100 * p.share:.0f}% negative ({p.neg}/{p.total})</title></circle>"
        )
    for when, severity, label, href in markers:
        if first is None or not first <= when < first + len(points) * step:
            continue
        x = pad_l + ((when - first) // step) * bw + bw / 2
        colour = NEG if severity == "critical" else "#e67e22"
        parts.append(
            f'<a href="{escape(href)}"><path class="marker" data-hour="{_iso(when)}" '
            f'd="M{x - 6:.1f},{pad_t - 14} L{x + 6:.1f},{pad_t - 14} L{x:.1f},{pad_t - 4} Z" fill="{colour}">'
            f"<title>{escape(label)}</title></path></a>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _span(start: datetime, step: timedelta) -> str:
    if step == HOUR:
        return f"{start:%Y-%m-%d %H:00}"
    return f"{start:%Y-%m-%d %H:00}-{start + step:%H:00}"
