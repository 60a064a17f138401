"""Hostile feeds against a real HTTP server on 127.0.0.1 (tests/feedserver.py): each test is an attack or fault
from issue #9 that broke ingestion before, and what finsent does about it now (docs/reliability.md)."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
import zlib
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from pipeline import store
from pipeline.config import ConfigError, FinsentConfig, SourceConfig, load_config
from pipeline.cycle import ingest_all
from pipeline.ingest import display_url, fetch_source
from pipeline.store import schema as s
from tests.conftest import ROOT
from tests.feedserver import FEEDS_DIR, FeedServer
from tests.test_ingest import WATCHLIST, rss, src

MEMORY_BOUND = 16_000_000  # bytes of Python allocations one hostile fetch may peak at (measured: < 2 MB)

_MEASURE = """
import json, sys, tracemalloc
from pipeline.config import SourceConfig
from pipeline.ingest import display_url, fetch_source
src = SourceConfig.model_validate(json.loads(sys.argv[1]))
tracemalloc.start()
r = fetch_source(src, [])
peak = tracemalloc.get_traced_memory()[1]
longest = max((len(d.title) + len(d.summary) for d in r.documents), default=0)
print(json.dumps({"status": r.status, "error": r.error, "peak": peak, "longest": longest}))
"""


def fetch_measured(source: SourceConfig) -> dict:
    """Fetch in a fresh interpreter and report the peak of traced allocations (tracemalloc), so a bomb that
    gets through shows up as memory, not as time, and cannot take the test process down with it."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, source.model_dump_json()],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- bounded everything


def test_doctype_entity_expansion_is_refused_under_a_memory_bound(feed_server):
    """A 5 KB entity used 2,000 times in one description: 10 million characters once expanded."""
    blob = "A" * 5_000
    uses = "&e;" * 2_000
    body = (
        f'<?xml version="1.0"?>\n<!DOCTYPE rss [\n<!ENTITY e "{blob}">\n]>\n'  # line starts: what feedparser expands
        '<rss version="2.0"><channel><title>t</title>'
        f"<item><title>Bomb</title><guid>b-1</guid><description>{uses}</description></item></channel></rss>"
    )
    url = feed_server.put("entity.xml", body)
    got = fetch_measured(src("entity", url, timeout_s=30))
    assert got["peak"] < MEMORY_BOUND and got["longest"] == 0, f"peak {got['peak']:,} bytes, {got['longest']:,} chars"
    assert got["status"] == "failed" and "DOCTYPE entities" in got["error"] and "refused" in got["error"]


def test_external_doctype_is_stripped_and_the_feed_kept(feed_server):
    doctype = '<!DOCTYPE rss PUBLIC "-//Netscape Communications//DTD RSS 0.91//EN" "http://my.netscape.com/rss.dtd">'
    body = rss(["<item><title>Acme beats</title><guid>d-1</guid></item>"]).replace("?>", "?>" + doctype, 1)
    r = fetch_source(src("dtd", feed_server.put("dtd.xml", body)), WATCHLIST)
    assert r.status == "ok" and [d.title for d in r.documents] == ["Acme beats"]


def _stacked_gzip(size: int) -> bytes:
    """gzip(gzip(`size` zero bytes)), built in 1 MiB steps so the test itself stays small."""
    inner = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [inner.compress(b"\0" * (1 << 20)) for _ in range(size >> 20)]
    parts.append(inner.flush())
    return gzip.compress(b"".join(parts), 9)


def test_stacked_gzip_bomb_stays_under_a_memory_bound(feed_server):
    body = _stacked_gzip(200 << 20)  # 200 MiB decoded, well under 1 KB on the wire
    assert len(body) < 4_000
    url = feed_server.put("bomb.xml", body)
    feed_server.override("bomb.xml", body=body, headers={"Content-Encoding": "gzip, gzip"})
    got = fetch_measured(src("bomb", url, max_bytes=1_000_000, timeout_s=30))
    assert got["peak"] < MEMORY_BOUND, f"peak {got['peak']:,} bytes"
    assert got["status"] == "failed" and "decoded response exceeds max_bytes=1000000" in got["error"]


def test_gzip_encoded_feed_is_decoded(feed_server):
    body = (FEEDS_DIR / "news_rss.xml").read_bytes()
    url = feed_server.put("gz.xml", body)
    feed_server.override("gz.xml", body=gzip.compress(gzip.compress(body)), headers={"Content-Encoding": "gzip, gzip"})
    r = fetch_source(src("gz", url), WATCHLIST)
    assert r.status == "ok" and len(r.documents) == 4


def test_text_fields_are_capped(feed_server):
    items = [
        f"<item><title>{'Acme ' * 400}</title><guid>c-1</guid><description>{'word ' * 20_000}</description>"
        f"<link>https://example.com/{'x' * 5_000}</link></item>"
    ]
    url = feed_server.put("long.xml", rss(items))
    r = fetch_source(src("long", url, max_title_chars=100, max_summary_chars=1_000, max_link_chars=200), WATCHLIST)
    assert r.status == "ok"
    (doc,) = r.documents
    assert 0 < len(doc.title) <= 100 and 900 < len(doc.summary) <= 1_000 and doc.link is None


def test_headers_at_one_byte_a_time_end_at_the_deadline(feed_server):
    url = feed_server.override("news_rss.xml", header_drip=0.05)  # ~150 header bytes: 7 s unless cut
    r = fetch_source(src("slowloris", url, timeout_s=0.5), WATCHLIST)
    assert feed_server.drip_outcome("news_rss.xml") == "cut"  # finsent hung up before the headers were done
    assert r.status == "failed" and "deadline exceeded" in r.error and "timed out after 0.5 s" in r.error


def test_slow_redirect_chain_ends_at_the_deadline(feed_server):
    hops = 8
    for i in range(hops):
        target = f"/hop{i + 1}" if i + 1 < hops else "/news_rss.xml"
        feed_server.override(f"hop{i}", status=302, delay=0.3, headers={"Location": target})
    r = fetch_source(src("chain", feed_server.url("hop0"), timeout_s=1.0), WATCHLIST)
    assert feed_server.hits("news_rss.xml") == 0 and feed_server.hits(f"hop{hops - 1}") == 0
    assert r.status == "failed" and "deadline exceeded" in r.error


def test_sources_are_fetched_concurrently(feed_server, engine):
    """`first` answers only after `second` was requested: fetched one after another, `first` would hit its
    deadline before `second` is ever asked for."""
    feed_server.put("first.xml", rss(["<item><title>Acme first</title><guid>f-1</guid></item>"]))
    feed_server.put("second.xml", rss(["<item><title>Acme second</title><guid>s-1</guid></item>"]))
    feed_server.override("first.xml", wait_for="/second.xml")
    cfg = FinsentConfig(sources=[src(n, feed_server.url(f"{n}.xml")) for n in ("first", "second")])
    outcomes = ingest_all(cfg, engine)
    assert [(o.source, o.status, o.new_documents) for o in outcomes] == [("first", "ok", 1), ("second", "ok", 1)]


# --------------------------------------------------------------------------- URL policy


def test_loopback_feed_is_refused_without_the_opt_in(feed_server):
    r = fetch_source(src("internal", feed_server.url("news_rss.xml"), allow_private_network=False), WATCHLIST)
    assert r.status == "failed" and "refused to connect" in r.error and "loopback" in r.error
    assert feed_server.hits("news_rss.xml") == 0


def test_redirect_to_another_loopback_port_is_refused(feed_server):
    """The source may reach its own host:port; a 302 to another internal service on the same host may not."""
    with FeedServer() as internal:
        internal.put("admin.xml", rss(["<item><title>Internal admin secret</title><guid>i-1</guid></item>"]))
        url = feed_server.override("feed.xml", status=302, headers={"Location": internal.url("admin.xml")})
        own = feed_server.base_url.removeprefix("http://")
        r = fetch_source(src("ssrf", url, allow_private_network=[own]), WATCHLIST)
        assert r.status == "failed" and "refused to connect" in r.error
        assert internal.base_url.removeprefix("http://") in r.error
        assert internal.hits("admin.xml") == 0
        opted_in = fetch_source(src("ssrf", url, allow_private_network=True), WATCHLIST)
        assert opted_in.status == "ok" and internal.hits("admin.xml") == 1  # the refusal above was the policy


@pytest.mark.parametrize(
    ("host", "kind"), [("2002:7f00:1::1", "loopback (6to4 of 127.0.0.1)"), ("2002:a9fe:a9fe::", "link-local")]
)
def test_6to4_address_embedding_an_internal_ipv4_is_refused(host, kind):
    """2002::/16 carries an IPv4 address inside; one wrapping 127.0.0.1 or 169.254.169.254 is not public."""
    r = fetch_source(src("sixtofour", f"http://[{host}]:8080/feed.xml", allow_private_network=False), WATCHLIST)
    assert r.status == "failed" and "refused to connect" in r.error and kind in r.error
    assert f"(http://[{host}]:8080/feed.xml)" in r.error
    public = fetch_source(
        src("sixtofour", "http://[2002:808:808::1]:9/feed.xml", allow_private_network=False, timeout_s=0.5), WATCHLIST
    )
    assert "refused to connect" not in (public.error or "")  # 8.8.8.8 inside: public, tried (and unreachable here)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:99999/feed.xml", "Port out of range"),
        ("ftp://example.com/feed.xml", "must start with http://, https:// or file://"),
        ("http:///feed.xml", "has no host"),
    ],
)
def test_impossible_url_is_rejected_at_config_load_naming_the_source(tmp_path, url, expected):
    path = tmp_path / "finsent.yaml"
    path.write_text(
        f"sources:\n  - name: good\n    url: https://example.com/a.xml\n  - name: badsource\n    url: {url}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, env=False)
    assert "badsource" in str(err.value) and expected in str(err.value) and "'good'" not in str(err.value)


def test_bad_url_that_gets_past_validation_does_not_stop_the_other_sources(feed_server, engine):
    good = src("good", feed_server.url("news_rss.xml"))
    bad = SourceConfig.model_construct(**{**good.model_dump(), "name": "bad", "url": "http://127.0.0.1:99999/feed.xml"})
    cfg = FinsentConfig(sources=[good]).model_copy(update={"sources": [bad, good]})
    outcomes = {o.source: o for o in ingest_all(cfg, engine)}
    assert outcomes["good"].status == "ok" and outcomes["good"].new_documents == 4
    assert outcomes["bad"].status == "failed" and "'bad'" in (outcomes["bad"].error or "")


# --------------------------------------------------------------------------- secrets


def test_credentials_never_reach_sources_url_or_logs(feed_server, engine, caplog, monkeypatch):
    monkeypatch.setenv("FEED_AUTH", "Bearer env-secret-1")
    monkeypatch.setenv("FEED_KEY", "env-secret-2")
    token = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4"
    url = feed_server.url(f"{token}/feed.xml").replace("http://", "http://bob:hunter2@") + "?token=url-secret&q=acme"
    feed_server.put(f"{token}/feed.xml", rss(["<item><title>Acme</title><guid>k-1</guid></item>"]))
    source = src("keyed", url, headers_env={"X-Api-Key": "FEED_AUTH"}, query_env={"api_key": "FEED_KEY"})
    caplog.set_level(logging.DEBUG)
    (outcome,) = ingest_all(FinsentConfig(sources=[source]), engine)
    assert outcome.status == "ok"
    sent = feed_server.requests[-1]
    assert sent.headers["X-Api-Key"] == "Bearer env-secret-1" and "api_key=env-secret-2" in sent.query
    with store.session_scope(engine) as session:
        stored = session.execute(select(s.Source.url).where(s.Source.name == "keyed")).scalar_one()
    assert stored.endswith("/***/feed.xml?token=***&q=acme") and "127.0.0.1" in stored
    feed_server.override(f"{token}/feed.xml", status=500)
    (failed,) = ingest_all(FinsentConfig(sources=[source]), engine)
    assert failed.status == "failed" and "HTTP 500" in (failed.error or "")
    for text in (stored, caplog.text, failed.error or ""):
        for secret in ("hunter2", "bob", "url-secret", "env-secret", token):
            assert secret not in text


def test_credentials_are_not_forwarded_to_another_origin_on_redirect(feed_server, monkeypatch):
    """A 302 to another host:port gets the feed fetched, but neither the env header nor the env query value."""
    monkeypatch.setenv("FEED_AUTH", "Bearer env-secret-1")
    monkeypatch.setenv("FEED_KEY", "env-secret-2")
    keyed = {"headers_env": {"X-Api-Key": "FEED_AUTH"}, "query_env": {"api_key": "FEED_KEY"}}
    with FeedServer() as other:
        other.put("feed.xml", rss(["<item><title>Acme elsewhere</title><guid>o-1</guid></item>"]))
        elsewhere = other.url("feed.xml").replace("127.0.0.1", "localhost") + "?api_key=env-secret-2&q=1"
        url = feed_server.override("moved.xml", status=302, headers={"Location": elsewhere})
        r = fetch_source(src("keyed", url, **keyed), WATCHLIST)
        assert r.status == "ok" and other.hits("feed.xml") == 1
        assert feed_server.requests[-1].headers.get("X-Api-Key") == "Bearer env-secret-1"  # the source's own host
        hop = other.requests[-1]
        assert "X-Api-Key" not in hop.headers and "env-secret" not in hop.query and "q=1" in hop.query
    feed_server.override("same.xml", status=302, headers={"Location": "/news_rss.xml"})
    same = fetch_source(src("keyed", feed_server.url("same.xml"), **keyed), WATCHLIST)
    assert same.status == "ok" and feed_server.requests[-1].headers.get("X-Api-Key") == "Bearer env-secret-1"


def test_token_in_a_file_path_stays_out_of_errors(tmp_path):
    token = "sk_live_abcdEFGH1234ijkl5678"
    missing = fetch_source(src("local", (tmp_path / token / "feed.xml").as_uri()), WATCHLIST)
    (tmp_path / "dir" / token).mkdir(parents=True)
    folder = fetch_source(src("local", (tmp_path / "dir" / token).as_uri()), WATCHLIST)
    assert "file not found" in missing.error and "is not a regular file" in folder.error
    for r in (missing, folder):
        assert r.status == "failed" and token not in r.error and "/***" in r.error


def test_token_with_underscores_in_a_url_path_is_redacted(feed_server):
    token = "sk_live_abcdEFGH1234ijkl5678"
    r = fetch_source(src("keyed", feed_server.url(f"rss/{token}/news")), WATCHLIST)
    assert r.status == "failed" and "HTTP 404" in r.error and token not in r.error and "/rss/***/news" in r.error
    assert display_url(f"https://feeds.example.com/rss/{token}/news") == "https://feeds.example.com/rss/***/news"
    plain = "https://feeds.example.com/rss/market_news/latest"
    assert display_url(plain) == plain


def test_redirect_to_a_local_file_is_refused_naming_its_scheme(feed_server):
    url = feed_server.override("moved.xml", status=302, headers={"Location": "file:///etc/passwd"})
    r = fetch_source(src("moved", url), WATCHLIST)
    assert r.status == "failed" and "refused a redirect to a file:// URL" in r.error


def test_missing_credential_env_var_is_a_clear_failure(feed_server, monkeypatch):
    monkeypatch.delenv("FEED_NOPE", raising=False)
    r = fetch_source(src("keyed", feed_server.url("news_rss.xml"), headers_env={"X-Key": "FEED_NOPE"}), WATCHLIST)
    assert r.status == "failed" and "FEED_NOPE is not set" in r.error and feed_server.hits("news_rss.xml") == 0


# --------------------------------------------------------------------------- encodings, dates, bidi


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_without_bom_is_accepted(feed_server, codec):
    body = rss(["<item><title>Société Générale: résultats €</title><guid>u-1</guid></item>"]).replace("UTF-8", "UTF-16")
    url = feed_server.put("utf16.xml", body.encode(codec), "application/xml")
    r = fetch_source(src("utf16", url), WATCHLIST)
    assert r.status == "ok" and r.documents[0].title == "Société Générale: résultats €"


def test_published_dates_are_clamped(feed_server):
    soon = datetime.now(UTC).replace(microsecond=0)
    items = [
        "<item><title>From 2099</title><guid>p-1</guid><pubDate>Thu, 01 Jan 2099 00:00:00 GMT</pubDate></item>",
        "<item><title>From 1900</title><guid>p-2</guid><pubDate>Mon, 01 Jan 1900 00:00:00 GMT</pubDate></item>",
        f"<item><title>Just now</title><guid>p-3</guid><pubDate>{soon:%a, %d %b %Y %H:%M:%S} GMT</pubDate></item>",
        "<item><title>Last year</title><guid>p-4</guid><pubDate>Wed, 19 Nov 2025 10:00:00 GMT</pubDate></item>",
    ]
    before = datetime.now(UTC)
    r = fetch_source(src("dates", feed_server.put("dates.xml", rss(items))), WATCHLIST)
    after = datetime.now(UTC)
    future, ancient, now, last_year = r.documents
    assert before <= future.published_at <= after and before <= ancient.published_at <= after
    assert now.published_at == soon and last_year.published_at == datetime(2025, 11, 19, 10, tzinfo=UTC)


def test_bidi_controls_are_dropped(feed_server):
    title = "Acme \u202eevil\u202c \u2066isolated\u2069 \u200eRLM\u200f &#x202E;ref"
    url = feed_server.put("bidi.xml", rss([f"<item><title>{title}</title><guid>b-1</guid></item>"]))
    r = fetch_source(src("bidi", url), WATCHLIST)
    assert r.status == "ok" and r.documents[0].title == "Acme evil isolated RLM ref"
