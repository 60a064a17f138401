"""Personal data is masked before a document is stored (issue #15 item 3): social posts served by a real HTTP
server on 127.0.0.1, ingested into the real Postgres, then every stored text and the log are checked."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from sqlalchemy import select

from pipeline import store
from pipeline.config import FinsentConfig, IngestConfig, PrivacyConfig, WatchlistEntity
from pipeline.cycle import ingest_all
from pipeline.store import schema as s
from tests.test_ingest import src

WATCHLIST = [WatchlistEntity(ticker="NWB", name="Northwind Bank", aliases=["Northwind"])]
PERSONAL = [
    "jane.doe+stocks@example.com",
    "415-555-0142",
    "+44 20 7946 0958",
    "(212) 555-0199",
    "ir@northwind-bank.example",
    "mike_trades",
    "bagholder_99",
    "SEC_Enforcement",
]


def stored_texts(engine) -> list[str]:
    with store.session_scope(engine) as session:
        rows = session.execute(select(s.Document.title, s.Document.summary).order_by(s.Document.external_id)).all()
    return [f"{title} {summary}".strip() for title, summary in rows]


def test_social_posts_are_stored_without_personal_data(feed_server, engine, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = FinsentConfig(
        sources=[src("st-nwb", feed_server.url("social_pii.json"), kind="stocktwits")], watchlist=WATCHLIST
    )
    (outcome,) = ingest_all(cfg, engine)
    assert outcome.status == "ok" and outcome.new_documents == 4
    texts = stored_texts(engine)
    for text in (*texts, caplog.text):
        for item in PERSONAL:
            assert item not in text
    assert texts[0] == "$NWB is toast. DM me at [email] or text [phone] for my picks"
    assert texts[1] == "@user told me Northwind Bank cuts jobs; call him on [phone]"
    # the company's own handle, cashtags, prices, dates and volumes stay as written
    assert texts[2] == "@NorthwindBank confirms the dividend, $NWB up 2.5% to $41.20 on 2026-11-20 (vol 1,234,567)"
    assert texts[3] == "u/user and @user: write to [email] or [phone]"
    with store.session_scope(engine) as session:
        entities = session.execute(select(s.DocumentEntity.entity).distinct()).scalars().all()
    assert entities == ["NWB"]


def test_masking_rules_are_configurable(feed_server, engine):
    rules = PrivacyConfig(mask_phones=False, keep_handles=["SEC_Enforcement"])
    cfg = FinsentConfig(
        sources=[src("st-nwb", feed_server.url("social_pii.json"), kind="stocktwits")],
        watchlist=WATCHLIST,
        ingest=IngestConfig(privacy=rules),
    )
    ingest_all(cfg, engine)
    last = stored_texts(engine)[3]
    assert last == "u/user and @SEC_Enforcement: write to [email] or (212) 555-0199"
    assert not re.search(r"[\w.+-]+@[\w-]+\.\w", " ".join(stored_texts(engine)))


def test_the_documented_rules_are_the_configurable_ones():
    """docs/privacy.md lists the masking rules: every `ingest.privacy` setting, and no setting that does not exist."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text()
    table = doc[doc.index("| rule | setting |") : doc.index("Cashtags (`$NWB`)")]
    documented = set(re.findall(r"`(\w+):", table))
    assert documented == set(PrivacyConfig.model_fields)
