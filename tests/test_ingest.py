"""Ingestion against a real HTTP server on 127.0.0.1 (tests/feedserver.py) and the real Postgres."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from pipeline import store
from pipeline.config import SourceConfig, WatchlistEntity
from pipeline.ingest import canonical_url, content_hash, extract_entities, fetch_source, strip_html
from pipeline.store import schema as s
from tests.feedserver import FEEDS_DIR, FeedServer

WATCHLIST = [
    WatchlistEntity(ticker="ACME", name="Acme Corp", aliases=["Acme", "Acme Corporation"]),
    WatchlistEntity(ticker="GLBX", name="Globex", aliases=["Globex Corporation"]),
    WatchlistEntity(ticker="F", name="Ford Motor", aliases=["Ford"]),
]


def src(name: str, url: str, kind: str = "rss", **kw) -> SourceConfig:
    kw.setdefault("timeout_s", 2.0)
    kw.setdefault("retries", 0)
    kw.setdefault("allow_private_network", True)  # the test feeds are on 127.0.0.1
    return SourceConfig(name=name, kind=kind, url=url, **kw)


def fetch(server: FeedServer, path: str, kind: str = "rss", name: str = "src", **kw):
    return fetch_source(src(name, server.url(path), kind, **kw), WATCHLIST)


def ents(doc) -> list[tuple[str, str]]:
    return [(e.entity, e.kind) for e in doc.entities]


def rss(items: list[str], extra: str = "") -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>gen</title>'
        f"{extra}{''.join(items)}</channel></rss>"
    )


# --------------------------------------------------------------------------- good feeds


def test_rss_entries_are_normalised(feed_server):
    before = datetime.now(UTC)
    r = fetch(feed_server, "news_rss.xml", name="newswire")
    after = datetime.now(UTC)
    assert (r.status, r.http_status, r.error, r.entries_seen, r.entries_skipped) == ("ok", 200, None, 4, 0)
    assert r.etag and r.etag.startswith('"') and r.last_modified
    assert feed_server.requests[0].headers["User-Agent"] == "finsent/0.1"
    acme, globex, bonds, jnj = r.documents
    assert all(d.source == "newswire" for d in r.documents)

    assert acme.external_id == "nw-1001"
    assert acme.title == "Acme Corp. shares plunge 12% as $ACME misses estimates"
    assert acme.summary == "Profit fell to $1.2bn & revenue dropped $5 per share."  # script dropped, &amp; decoded
    assert acme.published_at == datetime(2026, 11, 20, 14, 3, tzinfo=UTC)
    assert acme.published_at.utcoffset().total_seconds() == 0
    assert acme.language == "en-us"
    assert acme.link == "https://news.example.com/markets/acme-plunge"
    assert ents(acme) == [("ACME", "watchlist")]

    # no GUID: canonical link (host lower-cased, utm_* and fragment dropped); CDATA HTML stripped
    assert globex.external_id == "https://news.example.com/markets/globex-outlook?id=7"
    assert globex.summary == "The Globex Corporation board raised guidance."
    assert ents(globex) == [("GLBX", "watchlist")]

    # neither GUID nor link: the content hash; no date: fetch time
    assert (
        bonds.external_id
        == bonds.content_hash
        == content_hash("Bond yields steady ahead of the Fed", "Treasury markets were quiet.")
    )
    assert before <= bonds.published_at <= after and bonds.link is None

    assert jnj.title == "Johnson & Johnson holds dividend"
    assert jnj.published_at == datetime(2026, 11, 19, 21, 15, tzinfo=UTC)
    assert ents(jnj) == [("JNJ", "cashtag")]


def test_atom_feed(feed_server):
    r = fetch(feed_server, "news_atom.xml", kind="atom")
    assert r.status == "ok" and len(r.documents) == 2
    merger, ford = r.documents
    assert merger.external_id == "urn:example:wire:501"
    assert merger.title == "Globex & Acme agree merger talks"
    assert merger.summary == "Shares of GLBX rose \u2014 analysts cautious."
    assert merger.published_at == datetime(2026, 11, 20, 10, 0, tzinfo=UTC)  # published wins over updated
    assert merger.language == "en-gb"
    assert ents(merger) == [("GLBX", "watchlist"), ("ACME", "watchlist")]
    assert ford.published_at == datetime(2026, 11, 20, 9, 30, tzinfo=UTC)  # only updated
    assert ford.summary == "$F fell 3% in early trading."  # from <content>
    assert ents(ford) == [("F", "watchlist")]
    assert ford.link == "https://wire.example.com/502"


def test_reddit_atom(feed_server):
    r = fetch(feed_server, "reddit_stocks.atom", kind="reddit", name="reddit-stocks")
    assert r.status == "ok"
    post, link_post = r.documents
    assert post.external_id == "t3_1abcde"
    assert post.title == "Acme is done, bailing out"
    assert post.summary == "Down 40% on $ACME since the guidance cut. Selling everything, this is a disaster."
    assert post.link == "https://www.reddit.com/r/stocks/comments/1abcde/acme/"
    assert post.published_at == datetime(2026, 11, 20, 14, 50, tzinfo=UTC)
    assert ents(post) == [("ACME", "watchlist")]
    assert link_post.summary == ""  # only Reddit's "submitted by ... [link] [comments]" footer
    assert ents(link_post) == [("GLBX", "watchlist")]


def test_stocktwits_json(feed_server, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        r = fetch(feed_server, "stocktwits_acme.json", kind="stocktwits", name="st")
    assert (r.status, r.entries_seen, r.entries_skipped) == ("ok", 3, 1)  # message 910 has no body
    assert "skipped 1" in caplog.text and "st" in caplog.text
    bear, bull = r.documents
    assert bear.external_id == "912"
    assert bear.title == "$ACME guidance cut is brutal, & I am out. Lost $3k today"
    assert bear.published_at == datetime(2026, 11, 20, 14, 3, tzinfo=UTC)
    assert bear.link == "https://stocktwits.com/trader_joe/message/912"
    assert ents(bear) == [("ACME", "watchlist"), ("SPY", "cashtag")]  # symbols count as cashtags; $3k is money
    assert ents(bull) == [("GLBX", "watchlist")]
    assert bear.text == bear.title


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"messages": "nope"}', 'expected a JSON object with a "messages" list'),
        (b"[1, 2]", 'expected a JSON object with a "messages" list'),
        (b'{"messages": [', "not valid JSON"),
        (b'{"messages": []}', "stream is empty"),
        (b'{"messages": [{"id": 1}, {"body": "x"}]}', "none of the 2 messages is valid"),
    ],
)
def test_stocktwits_bad_payloads_fail_clearly(feed_server, body, expected):
    url = feed_server.put("st.json", body)
    r = fetch_source(src("st", url, "stocktwits"), WATCHLIST)
    assert r.status == "failed" and r.documents == []
    assert expected in r.error and "'st'" in r.error and url in r.error


# --------------------------------------------------------------------------- bad feeds


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("malformed.xml", "malformed feed"),
        ("not_a_feed.html", "returned an HTML page (text/html), not an RSS/Atom feed"),
        ("empty_rss.xml", "feed is empty"),
    ],
)
def test_bad_feed_is_a_failed_fetch_with_a_clear_logged_error(feed_server, caplog, path, expected):
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        r = fetch(feed_server, path, name="broken-src")
    assert r.status == "failed" and r.documents == [] and r.http_status == 200
    assert expected in r.error
    assert r.error.startswith(f"source 'broken-src' ({feed_server.url(path)}):")
    assert any(
        rec.levelno >= logging.WARNING and "broken-src" in rec.getMessage() and expected in rec.getMessage()
        for rec in caplog.records
    )


def test_html_page_served_as_xml_is_still_not_a_feed(feed_server):
    url = feed_server.put("moved.xml", (FEEDS_DIR / "not_a_feed.html").read_bytes(), "application/xml")
    r = fetch_source(src("s", url), WATCHLIST)
    assert r.status == "failed" and "HTML page" in r.error


def test_empty_body_fails(feed_server):
    r = fetch_source(src("s", feed_server.put("zero.xml", b"")), WATCHLIST)
    assert r.status == "failed" and "empty response" in r.error


def test_minor_bozo_with_entries_is_kept(feed_server, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        r = fetch(feed_server, "minor_bozo.xml", name="sloppy")
    assert r.status == "ok"
    assert [d.title for d in r.documents] == ["Acme settles lawsuit", "Globex opens new plant"]
    assert [d.external_id for d in r.documents] == ["sl-1", "sl-2"]
    assert "not well-formed" in caplog.text and "sloppy" in caplog.text


def test_500_is_retried_with_backoff_then_fails(feed_server):
    feed_server.override("news_rss.xml", status=500)
    t = time.monotonic()
    r = fetch(feed_server, "news_rss.xml", retries=2)
    elapsed = time.monotonic() - t
    assert r.status == "failed" and r.http_status == 500
    assert "HTTP 500 Internal Server Error (after 3 attempts)" in r.error
    assert feed_server.hits("news_rss.xml") == 3
    assert elapsed >= 0.2 + 0.4 - 0.05  # backoff 0.2 s then 0.4 s


def test_transient_503_recovers_on_retry(feed_server):
    feed_server.override("news_rss.xml", status=503, times=1)
    r = fetch(feed_server, "news_rss.xml", retries=2)
    assert r.status == "ok" and len(r.documents) == 4
    assert [q.status for q in feed_server.requests] == [503, 200]


def test_4xx_is_not_retried(feed_server):
    r = fetch(feed_server, "no_such_feed.xml", retries=3)
    assert r.status == "failed" and r.http_status == 404 and "HTTP 404 Not Found" in r.error
    assert feed_server.hits("no_such_feed.xml") == 1


def test_timeout_is_retried_then_fails(feed_server):
    feed_server.override("news_rss.xml", delay=3.0)
    t = time.monotonic()
    r = fetch(feed_server, "news_rss.xml", timeout_s=0.3, retries=1, deadline_s=2.0)
    assert r.status == "failed" and "timed out after 0.3 s" in r.error and "after 2 attempts" in r.error
    assert feed_server.hits("news_rss.xml") == 2
    assert time.monotonic() - t < 2.0


def test_slow_drip_is_cut_by_the_overall_deadline(feed_server):
    feed_server.override("news_rss.xml", drip=0.1)  # ~7 chunks x 0.1 s, each within the read timeout
    t = time.monotonic()
    r = fetch(feed_server, "news_rss.xml", timeout_s=0.35)
    assert r.status == "failed" and "timed out" in r.error
    assert time.monotonic() - t < 1.0


def test_retries_share_one_overall_deadline(feed_server):
    """A host that never answers costs the source's overall deadline, not (retries + 1) x timeout_s: with
    timeout_s 0.5 and 3 retries the fetch stops after the second attempt once 1.2 s are spent (4 attempts
    and about 3 s before)."""
    feed_server.override("news_rss.xml", delay=5.0)
    r = fetch(feed_server, "news_rss.xml", timeout_s=0.5, retries=3, deadline_s=1.2)
    assert r.status == "failed" and "the overall deadline of 1.2 s is spent" in r.error
    assert feed_server.hits("news_rss.xml") == 2


def test_overall_deadline_defaults_to_two_timeouts():
    assert src("a", "http://127.0.0.1:1/x.xml", timeout_s=15).fetch_deadline_s == 30
    assert src("a", "http://127.0.0.1:1/x.xml", deadline_s=7).fetch_deadline_s == 7


def test_server_down_is_a_failed_fetch():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = fetch_source(src("down", f"http://127.0.0.1:{port}/feed.xml", retries=1), WATCHLIST)
    assert r.status == "failed" and "connection failed" in r.error and f"127.0.0.1:{port}" in r.error


@pytest.mark.parametrize("content_length", [True, False])
def test_oversized_response_is_aborted(feed_server, content_length):
    body = rss([f"<item><title>Story {i}</title><guid>{i}</guid></item>" for i in range(2000)])
    url = feed_server.put("big.xml", body)
    feed_server.override("big.xml", content_length=content_length)
    r = fetch_source(src("big", url, max_bytes=10_000), WATCHLIST)
    assert r.status == "failed" and "max_bytes=10000" in r.error
    assert ("not downloaded" if content_length else "download aborted") in r.error


def test_secrets_in_the_feed_url_stay_out_of_errors_and_logs(feed_server, caplog):
    feed_server.override("news_rss.xml", status=403)
    url = feed_server.url("news_rss.xml").replace("http://", "http://bob:hunter2@") + "?api_key=s3cr3t&q=acme"
    caplog.set_level(logging.DEBUG)  # root at DEBUG, as a chatty Airflow task might run: httpx must still not log URLs
    with caplog.at_level(logging.DEBUG, logger="pipeline.ingest"):
        r = fetch_source(src("private", url), WATCHLIST)
    assert r.status == "failed" and "HTTP 403" in r.error and "q=acme" in r.error
    for text in (r.error, caplog.text):
        assert "hunter2" not in text and "s3cr3t" not in text and "bob" not in text


# --------------------------------------------------------------------------- conditional GET, files, encodings


def test_conditional_get(feed_server):
    s1 = src("cond", feed_server.url("news_rss.xml"))
    first = fetch_source(s1, WATCHLIST)
    assert first.status == "ok" and first.etag and first.last_modified

    by_etag = fetch_source(s1, WATCHLIST, etag=first.etag, last_modified=first.last_modified)
    assert (by_etag.status, by_etag.http_status, by_etag.documents) == ("not_modified", 304, [])
    assert feed_server.requests[-1].headers["If-None-Match"] == first.etag
    assert feed_server.requests[-1].headers["If-Modified-Since"] == first.last_modified

    by_date = fetch_source(s1, WATCHLIST, last_modified=first.last_modified)
    assert by_date.status == "not_modified" and "If-None-Match" not in feed_server.requests[-1].headers

    feed_server.put(
        "news_rss.xml",
        rss(["<item><title>Fresh story</title><guid>new-1</guid></item>"]),
        last_modified=time.time() + 10,
    )
    changed = fetch_source(s1, WATCHLIST, etag=first.etag, last_modified=first.last_modified)
    assert changed.status == "ok" and [d.title for d in changed.documents] == ["Fresh story"]
    assert changed.etag != first.etag


def test_file_url(tmp_path):
    feed = tmp_path / "feed.xml"
    feed.write_bytes((FEEDS_DIR / "news_rss.xml").read_bytes())
    s1 = src("local", feed.as_uri())
    r = fetch_source(s1, WATCHLIST)
    assert r.status == "ok" and len(r.documents) == 4 and r.last_modified
    assert fetch_source(s1, WATCHLIST, last_modified=r.last_modified).status == "not_modified"
    missing = fetch_source(src("gone", (tmp_path / "nope.xml").as_uri()), WATCHLIST)
    assert missing.status == "failed" and "file not found" in missing.error and "'gone'" in missing.error
    small = fetch_source(src("small", feed.as_uri(), max_bytes=100), WATCHLIST)
    assert small.status == "failed" and "max_bytes=100" in small.error


def test_latin1_feed_declaring_its_encoding(feed_server):
    r = fetch(feed_server, "latin1.xml")
    assert r.status == "ok"
    (doc,) = r.documents
    assert doc.title == "Société Générale: résultats en baisse"
    assert doc.summary == "Le titre recule de 4 % à Paris."
    assert doc.language == "fr"


def test_undeclared_legacy_encoding_is_detected_not_replaced(feed_server):
    """No declaration, not UTF-8: charset-normalizer picks a single-byte encoding instead of U+FFFD everywhere."""
    r = fetch(feed_server, "bad_bytes.xml")
    assert r.status == "ok"
    (doc,) = r.documents
    assert "\ufffd" not in doc.title + doc.summary
    assert doc.summary == "Café chain sales fell."
    assert ents(doc) == [("ACME", "watchlist")]


def test_http_charset_used_when_the_document_declares_none(feed_server):
    body = rss(["<item><title>Dax fällt – Anleger nervös</title><guid>de-1</guid></item>"]).encode("utf-8")
    body = body.decode("utf-8").replace('encoding="UTF-8"', "").encode("cp1252")
    url = feed_server.put("de.xml", body, "application/rss+xml; charset=windows-1252")
    r = fetch_source(src("de", url), WATCHLIST)
    assert r.status == "ok" and r.documents[0].title == "Dax fällt – Anleger nervös"


# --------------------------------------------------------------------------- volume and duplicates


def test_feed_of_10000_entries(feed_server):
    items = [
        f"<item><title>Story {i}: Acme and $GLBX move</title><guid>id-{i}</guid>"
        f"<description>&lt;p&gt;Body {i} &amp;amp; more&lt;/p&gt;</description>"
        f"<pubDate>Fri, 20 Nov 2026 09:03:00 GMT</pubDate></item>"
        for i in range(10_000)
    ]
    url = feed_server.put("huge.xml", rss(items))
    r = fetch_source(src("huge", url, timeout_s=10), WATCHLIST)
    assert r.status == "ok" and r.entries_seen == 10_000 and len(r.documents) == 10_000
    assert len({d.external_id for d in r.documents}) == 10_000
    assert r.documents[-1].summary == "Body 9999 & more"
    assert ents(r.documents[-1]) == [("ACME", "watchlist"), ("GLBX", "watchlist")]


def test_max_entries_caps_and_logs(feed_server, caplog):
    url = feed_server.put(
        "many.xml", rss([f"<item><title>Story {i}</title><guid>m-{i}</guid></item>" for i in range(250)])
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        r = fetch_source(src("many", url, max_entries=100), WATCHLIST)
    assert (r.status, r.entries_seen, r.entries_skipped, len(r.documents)) == ("ok", 250, 150, 100)
    assert r.documents[-1].external_id == "m-99"
    assert "skipped 150" in caplog.text


def test_same_story_on_two_sources_has_the_same_content_hash(feed_server):
    a = fetch(feed_server, "wire_a.xml", name="wire-a")
    b = fetch(feed_server, "wire_b.xml", name="wire-b")
    assert a.documents[0].content_hash == b.documents[0].content_hash
    assert a.documents[0].external_id != b.documents[0].external_id
    assert a.documents[1].content_hash != b.documents[0].content_hash


# --------------------------------------------------------------------------- storage (real Postgres)


def test_storing_fetches_twice_stores_nothing_twice(feed_server, engine):
    sources = [
        src("wire-a", feed_server.url("wire_a.xml")),
        src("wire-b", feed_server.url("wire_b.xml")),
        src("st", feed_server.url("stocktwits_acme.json"), "stocktwits"),
    ]
    for _ in range(2):
        results = [fetch_source(x, WATCHLIST) for x in sources]  # no validators: full re-download each time
        assert all(r.status == "ok" for r in results)
        with store.session_scope(engine) as session:
            store.ensure_sources(session, sources)
            new = [store.save_fetch(session, r).new_documents for r in results]
        assert new == ([2, 1, 2] if _ == 0 else [0, 0, 0])
    with store.session_scope(engine) as session:
        docs = session.execute(select(s.Document.source_name, s.Document.external_id, s.Document.content_hash)).all()
        assert len(docs) == 5
        story = content_hash("Acme CEO resigns amid accounting probe", "The board named an interim chief.")
        assert sorted(d.source_name for d in docs if d.content_hash == story) == ["wire-a", "wire-b"]
        entities = session.execute(
            select(s.Document.external_id, s.DocumentEntity.entity, s.DocumentEntity.kind)
            .join(s.DocumentEntity, s.DocumentEntity.document_id == s.Document.id)
            .where(s.Document.source_name == "st")
        ).all()
        assert sorted(entities) == [
            ("911", "GLBX", "watchlist"),
            ("912", "ACME", "watchlist"),
            ("912", "SPY", "cashtag"),
        ]
        fetches = session.scalars(select(s.SourceFetch).order_by(s.SourceFetch.id)).all()
        assert [(f.source_name, f.entries_new) for f in fetches] == [
            ("wire-a", 2),
            ("wire-b", 1),
            ("st", 2),
            ("wire-a", 0),
            ("wire-b", 0),
            ("st", 0),
        ]
        assert session.get(s.Source, "wire-a").etag == results[0].etag


def test_failed_fetch_after_a_good_one_keeps_documents_and_records_the_error(feed_server, engine):
    source = src("newswire", feed_server.url("news_rss.xml"))
    good = fetch_source(source, WATCHLIST)
    with store.session_scope(engine) as session:
        store.ensure_sources(session, [source])
        store.save_fetch(session, good)
    feed_server.put("news_rss.xml", (FEEDS_DIR / "malformed.xml").read_bytes())
    bad = fetch_source(source, WATCHLIST)
    assert bad.status == "failed"
    with store.session_scope(engine) as session:
        store.save_fetch(session, bad)
    with store.session_scope(engine) as session:
        titles = session.scalars(select(s.Document.title).order_by(s.Document.id)).all()
        assert len(titles) == 4 and titles[0].startswith("Acme Corp. shares plunge")
        last = session.scalars(select(s.SourceFetch).order_by(s.SourceFetch.id.desc())).first()
        assert (last.status, last.entries_new, last.http_status) == ("failed", 0, 200)
        assert "malformed feed" in last.error and "'newswire'" in last.error
        row = session.get(s.Source, "newswire")
        assert row.last_status == "failed" and row.last_error == bad.error
        assert row.etag == good.etag  # validators of the last good fetch survive a failure


# --------------------------------------------------------------------------- text helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$AAPL up, $5 dividend, $1.2bn buyback, US$3 fee, $3k", [("AAPL", "cashtag", "$AAPL")]),
        (
            "$aapl and $BRK.B, then $TSLA's drop.",
            [("AAPL", "cashtag", "$aapl"), ("BRK.B", "cashtag", "$BRK.B"), ("TSLA", "cashtag", "$TSLA")],
        ),
        ("price$ABC and $ABCDEFGH are not cashtags", []),
        ("acme corporation filed; ACME fell", [("ACME", "watchlist", "acme corporation")]),
        ("Acmeville and ACMEX are other names, glbx is lower case", []),
        ("Ford's F-150: F was flat", [("F", "watchlist", "Ford")]),
        ("F was flat, A$F fell", []),
        ("$F and $GLBX", [("F", "watchlist", "$F"), ("GLBX", "watchlist", "$GLBX")]),
        ("GLBX rose; Globex\ncorporation agreed", [("GLBX", "watchlist", "GLBX")]),
    ],
)
def test_extract_entities(text, expected):
    assert [(e.entity, e.kind, e.matched) for e in extract_entities(text, WATCHLIST)] == expected


def test_extract_entities_alias_spanning_whitespace_and_order():
    found = extract_entities("The Globex\n  Corporation board met; later $XYZ and Acme Corp.", WATCHLIST)
    assert [(e.entity, e.matched) for e in found] == [
        ("GLBX", "Globex\n  Corporation"),
        ("XYZ", "$XYZ"),
        ("ACME", "Acme Corp"),
    ]


def test_strip_html_and_canonical_url():
    assert (
        strip_html("<p>Tom &amp; Jerry&nbsp;<b>up</b></p><script>x()</script><!-- c -->\n\n 5 &lt; 6")
        == "Tom & Jerry up 5 < 6"
    )
    assert strip_html("a < b and AT&T") == "a < b and AT&T"
    assert strip_html("<div>one</div><div>two</div>") == "one two"
    assert canonical_url("HTTPS://Example.COM/a?utm_source=x&b=2&UTM_Campaign=y#frag") == "https://example.com/a?b=2"


def test_redirect_is_followed(feed_server):
    feed_server.override("old/feed.xml", status=301, headers={"Location": "/news_rss.xml"})
    r = fetch(feed_server, "old/feed.xml")
    assert r.status == "ok" and len(r.documents) == 4
    assert [q.path for q in feed_server.requests] == ["/old/feed.xml", "/news_rss.xml"]


def test_odd_stream_values_are_made_storable(feed_server, engine):
    """NUL bytes (Postgres rejects them), a huge id (too long for the unique index) and a bad date."""
    long_id = "x" * 5000
    url = feed_server.put(
        "odd.json",
        (
            '{"messages": ['
            '{"id": 1, "body": "$ACME nul\\u0000byte", "created_at": "yesterday-ish"},'
            f'{{"id": "{long_id}", "body": "long id", "created_at": "2026-11-20T10:00:00+01:00"}}'
            "]}"
        ),
    )
    before = datetime.now(UTC)
    r = fetch_source(src("odd", url, "stocktwits"), WATCHLIST)
    assert r.status == "ok"
    nul, long = r.documents
    assert nul.title == "$ACME nulbyte" and nul.published_at >= before
    assert long.external_id == "sha256:" + hashlib.sha256(long_id.encode()).hexdigest()
    assert long.published_at == datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    with store.session_scope(engine) as session:
        store.ensure_sources(session, [src("odd", url, "stocktwits")])
        assert store.save_fetch(session, r).new_documents == 2
        assert store.save_fetch(session, r).new_documents == 0


def test_one_unencodable_message_does_not_fail_the_stream(feed_server, engine):
    """A lone surrogate (a truncated emoji in JSON) is dropped; the valid messages beside it are kept and stored."""
    body = (
        '{"messages": ['
        '{"id": 1, "body": "$ACME guidance cut \\ud83d", "created_at": "2026-11-20T14:03:00Z", '
        '"symbols": [{"symbol": "ACME"}]},'
        '{"id": 2, "body": "$ACME beats estimates", "created_at": "2026-11-20T14:05:00Z", '
        '"symbols": [{"symbol": "ACME"}]}'
        "]}"
    )
    url = feed_server.put("surrogate.json", body.encode(), "application/json")
    r = fetch_source(src("st", url, "stocktwits"), WATCHLIST)
    assert r.status == "ok" and [d.external_id for d in r.documents] == ["1", "2"]
    assert r.documents[0].title == "$ACME guidance cut"
    with store.session_scope(engine) as session:
        store.ensure_sources(session, [src("st", url, "stocktwits")])
        assert store.save_fetch(session, r).new_documents == 2


@pytest.mark.parametrize("kind", ["rss", "atom"])
def test_surrogate_character_references_do_not_fail_a_feed(feed_server, kind):
    """Emoji written as two UTF-16 references are joined; a lone half becomes U+FFFD; the feed still parses."""
    titles = ["Acme rallies &#55357;&#56832;", "Broken half &#xD800; here", "Plain title"]
    if kind == "rss":
        items = "".join(f"<item><guid>g{i}</guid><title>{t}</title></item>" for i, t in enumerate(titles))
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>x</title>{items}</channel></rss>'
        )
    else:
        items = "".join(
            f"<entry><id>g{i}</id><title>{t}</title><updated>2026-11-20T10:00:00Z</updated></entry>"
            for i, t in enumerate(titles)
        )
        body = f'<?xml version="1.0" encoding="UTF-8"?><feed xmlns="http://www.w3.org/2005/Atom"><title>x</title><id>f</id>{items}</feed>'
    url = feed_server.put(f"surrogates.{kind}", body.encode(), "application/xml")
    r = fetch_source(src("s", url, kind), WATCHLIST)
    assert r.status == "ok", r.error
    assert [d.title for d in r.documents] == ["Acme rallies \U0001f600", "Broken half \ufffd here", "Plain title"]
