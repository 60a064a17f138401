"""Regenerate the bundled sample feeds: `python -m pipeline.demo_data.generate`.

A week of ordinary company news across two newswires, a Reddit feed and a StockTwits-style stream,
ending in one hour where negative news about Northwind Bank surges. Seeded, so the files are stable.
The companies are fictional.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from xml.sax.saxutils import escape

HERE = Path(__file__).resolve().parent
END = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)  # end of the spike window
START = END - timedelta(days=7, hours=1)

COMPANIES = [
    ("NWB", "Northwind Bank"),
    ("ACME", "Acme Motors"),
    ("GLBX", "Globex Energy"),
    ("INIT", "Initech Software"),
    ("UMB", "Umbrella Pharma"),
]
CONFS = ["Nordic", "Capital Markets Day", "Q4 investor", "Global Technology", "Healthcare"]

NEUTRAL = [
    "{c} will publish its interim report on {d} November",
    "{c} to present at the {conf} investor conference",
    "{c} appoints new head of investor relations",
    "{c} annual general meeting to be held in Helsinki",
    "{c} moves its Nordic headquarters to a new office",
    "{c} board proposes unchanged dividend policy",
    "{c} confirms schedule for the capital markets day",
    "{c} publishes its sustainability report for the year",
]
POSITIVE = [
    "{c} net sales rose {n}% to EUR {m} million in the third quarter",
    "{c} wins a EUR {m} million contract from a European customer",
    "{c} operating profit increased to EUR {m} million from EUR {k} million",
    "{c} raises its full-year outlook after strong demand",
    "{c} shares rise after record quarterly profit",
    "Analysts upgrade {c} to buy on improving margins",
]
NEGATIVE = [
    "{c} shares plunge after the company issues a profit warning",
    "{c} operating loss widened to EUR {m} million",
    "{c} cuts its outlook as sales fall {n}%",
    "{c} faces regulatory probe over lending practices",
    "{c} to cut {m} jobs as demand weakens",
    "Analysts downgrade {c} to sell after weak quarter",
]
SPIKE = [
    "Northwind Bank shares plunge {n}% after regulator opens investigation into lending practices",
    "Northwind Bank faces record fine as regulator finds serious compliance failures",
    "Northwind Bank cuts profit outlook and suspends dividend after loan losses",
    "Northwind Bank operating loss widened to EUR {m} million as bad loans surge",
    "Customers pull deposits from Northwind Bank after probe news, shares slump",
    "Rating agency downgrades Northwind Bank after loan losses, outlook negative",
    "Northwind Bank chief executive resigns amid lending scandal",
    "Northwind Bank to cut {m} jobs as losses mount",
]


def _fill(tpl: str, rng: random.Random, name: str) -> str:
    m = rng.choice([12, 18, 25, 40, 55, 120, 240])
    return tpl.format(
        c=name,
        conf=rng.choice(CONFS),
        d=rng.randint(1, 28),
        n=rng.randint(3, 30),
        m=m,
        k=max(1, m - rng.randint(2, 10)),
    )


def _items(rng: random.Random) -> list[tuple[datetime, str, str, str]]:
    """(time, ticker, headline, sentiment) for the whole week plus the spike hour."""
    out = []
    t = START
    while t < END - timedelta(hours=1):
        per_hour = rng.choice([1, 2, 2, 3, 3, 4]) if 7 <= t.hour <= 19 else rng.choice([0, 0, 1])
        for _ in range(per_hour):
            ticker, name = rng.choice(COMPANIES)
            kind = rng.choices(["neutral", "positive", "negative"], weights=[55, 30, 15])[0]
            tpl = rng.choice({"neutral": NEUTRAL, "positive": POSITIVE, "negative": NEGATIVE}[kind])
            out.append((t + timedelta(minutes=rng.randint(0, 59)), ticker, _fill(tpl, rng, name), kind))
        t += timedelta(hours=1)
    spike_start = END - timedelta(hours=1)
    for i in range(16):
        out.append(
            (
                spike_start + timedelta(minutes=2 + i * 3),
                "NWB",
                _fill(SPIKE[i % len(SPIKE)], rng, "Northwind Bank"),
                "negative",
            )
        )
    for _ in range(3):
        ticker, name = rng.choice(COMPANIES[1:])
        out.append(
            (
                spike_start + timedelta(minutes=rng.randint(0, 59)),
                ticker,
                _fill(rng.choice(NEUTRAL), rng, name),
                "neutral",
            )
        )
    return sorted(out)


def _rss(title: str, items: list[tuple[datetime, str, str, str]], slug: str) -> str:
    entries = []
    for i, (t, _ticker, head, _kind) in enumerate(items):
        entries.append(
            f"""  <item>
    <title>{escape(head)}</title>
    <link>https://news.example.com/{slug}/{t:%Y/%m/%d}/{i}</link>
    <guid isPermaLink="false">{slug}-{t:%Y%m%d%H%M}-{i}</guid>
    <pubDate>{format_datetime(t)}</pubDate>
  </item>"""
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0">\n<channel>\n'
        f"  <title>{escape(title)}</title>\n  <link>https://news.example.com/{slug}</link>\n"
        "  <description>Sample newswire for the finsent demo</description>\n  <language>en</language>\n"
        + "\n".join(entries)
        + "\n</channel>\n</rss>\n"
    )


def _reddit_atom(items: list[tuple[datetime, str, str, str]]) -> str:
    entries = []
    for i, (t, ticker, head, _kind) in enumerate(items):
        entries.append(
            f"""  <entry>
    <author><name>/u/trader{i % 17}</name></author>
    <category term="stocks" label="r/stocks"/>
    <id>t3_demo{i:05d}</id>
    <link href="https://www.reddit.com/r/stocks/comments/demo{i:05d}/"/>
    <updated>{t.isoformat()}</updated>
    <published>{t.isoformat()}</published>
    <title>{escape(head)} ${ticker}</title>
  </entry>"""
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<feed xmlns="http://www.w3.org/2005/Atom">\n'
        "  <title>r/stocks (sample)</title>\n  <id>https://www.reddit.com/r/stocks/.rss</id>\n"
        f"  <updated>{END.isoformat()}</updated>\n" + "\n".join(entries) + "\n</feed>\n"
    )


def _stocktwits(items: list[tuple[datetime, str, str, str]]) -> str:
    msgs = [
        {
            "id": 900000 + i,
            "body": f"${ticker} {head}",
            "created_at": t.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "symbols": [{"symbol": ticker}],
            "user": {"username": f"st_user{i % 11}"},
        }
        for i, (t, ticker, head, _kind) in enumerate(items)
    ]
    return json.dumps({"messages": list(reversed(msgs))}, indent=1) + "\n"


def generate(out: Path = HERE) -> dict[str, int]:
    rng = random.Random(20261120)
    items = _items(rng)
    buckets: dict[str, list] = {"newswire": [], "marketwatch": [], "reddit": [], "stocktwits": []}
    for it in items:
        buckets[rng.choices(list(buckets), weights=[40, 30, 15, 15])[0]].append(it)
    (out / "newswire.xml").write_text(_rss("Nordic Newswire (sample)", buckets["newswire"], "newswire"))
    (out / "marketwatch.xml").write_text(_rss("Market Wire (sample)", buckets["marketwatch"], "marketwire"))
    (out / "reddit_stocks.atom").write_text(_reddit_atom(buckets["reddit"]))
    (out / "stocktwits.json").write_text(_stocktwits(buckets["stocktwits"]))
    return {k: len(v) for k, v in buckets.items()}


if __name__ == "__main__":
    print(generate())
