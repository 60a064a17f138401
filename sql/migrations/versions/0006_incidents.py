"""incidents: alerts of one run that share evidence, and each alert's incident; v_sentiment_hourly counts stories

Alerts and the dashboard now count one unit: stories (distinct content) for market/entity/topic scopes,
items for a source scope, as the detector does. The view SQL is inline so this migration stays frozen.

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-01 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import pipeline.store.schema

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TZ = pipeline.store.schema.TZDateTime(timezone=True)


V_SENTIMENT_HOURLY_STORIES = """
CREATE OR REPLACE VIEW v_sentiment_hourly AS
WITH scored AS (
    SELECT d.id AS document_id,
           d.source_name,
           d.content_hash,
           date_trunc('hour', d.published_at, 'UTC') AS bucket_start,
           s.model_version_id,
           s.label,
           s.p_negative,
           COALESCE(s.topic, '(none)') AS topic
    FROM documents d
    JOIN scores s ON s.document_id = d.id
    JOIN v_current_model m ON m.model_version = s.model_version_id
),
dims AS (
    SELECT bucket_start, model_version_id, 'market' AS scope_kind, '*' AS scope_value, content_hash AS unit, label,
           p_negative FROM scored
    UNION ALL
    SELECT bucket_start, model_version_id, 'source', source_name, document_id::text, label, p_negative FROM scored
    UNION ALL
    SELECT bucket_start, model_version_id, 'topic', topic, content_hash, label, p_negative FROM scored
    UNION ALL
    SELECT sc.bucket_start, sc.model_version_id, 'entity', e.entity, sc.content_hash, sc.label, sc.p_negative
    FROM scored sc JOIN document_entities e ON e.document_id = sc.document_id
),
units AS (
    SELECT bucket_start, model_version_id, scope_kind, scope_value, unit,
           CASE WHEN bool_or(label = 'negative') THEN 'negative'
                WHEN bool_and(label = 'positive') THEN 'positive'
                ELSE 'neutral' END AS label,
           max(p_negative) AS p_negative
    FROM dims
    GROUP BY bucket_start, model_version_id, scope_kind, scope_value, unit
)
SELECT bucket_start,
       bucket_start + interval '1 hour' AS bucket_end,
       scope_kind,
       scope_value,
       model_version_id AS model_version,
       count(*) AS total_count,
       count(*) FILTER (WHERE label = 'negative') AS neg_count,
       count(*) FILTER (WHERE label = 'neutral') AS neu_count,
       count(*) FILTER (WHERE label = 'positive') AS pos_count,
       (count(*) FILTER (WHERE label = 'negative'))::float8 / count(*) AS neg_share,
       avg(p_negative) AS mean_p_negative
FROM units
GROUP BY bucket_start, scope_kind, scope_value, model_version_id
"""

V_SENTIMENT_HOURLY_DOCUMENTS = """
CREATE OR REPLACE VIEW v_sentiment_hourly AS
WITH scored AS (
    SELECT d.id AS document_id,
           d.source_name,
           date_trunc('hour', d.published_at, 'UTC') AS bucket_start,
           s.model_version_id,
           s.label,
           s.p_negative,
           COALESCE(s.topic, '(none)') AS topic
    FROM documents d
    JOIN scores s ON s.document_id = d.id
    JOIN v_current_model m ON m.model_version = s.model_version_id
),
dims AS (
    SELECT bucket_start, model_version_id, 'market' AS scope_kind, '*' AS scope_value, label, p_negative FROM scored
    UNION ALL
    SELECT bucket_start, model_version_id, 'source', source_name, label, p_negative FROM scored
    UNION ALL
    SELECT bucket_start, model_version_id, 'topic', topic, label, p_negative FROM scored
    UNION ALL
    SELECT sc.bucket_start, sc.model_version_id, 'entity', e.entity, sc.label, sc.p_negative
    FROM scored sc JOIN document_entities e ON e.document_id = sc.document_id
)
SELECT bucket_start,
       bucket_start + interval '1 hour' AS bucket_end,
       scope_kind,
       scope_value,
       model_version_id AS model_version,
       count(*) AS total_count,
       count(*) FILTER (WHERE label = 'negative') AS neg_count,
       count(*) FILTER (WHERE label = 'neutral') AS neu_count,
       count(*) FILTER (WHERE label = 'positive') AS pos_count,
       (count(*) FILTER (WHERE label = 'negative'))::float8 / count(*) AS neg_share,
       avg(p_negative) AS mean_p_negative
FROM dims
GROUP BY bucket_start, scope_kind, scope_value, model_version_id
"""


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("head_alert_id", sa.String(length=64), nullable=False),
        sa.Column("head_scope_kind", sa.String(length=16), nullable=False),
        sa.Column("head_scope_value", sa.String(length=200), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("scopes", JSON, nullable=False),
        sa.Column("opened_at", TZ, nullable=False),
        sa.Column("closed_at", TZ, nullable=True),
        sa.Column("message_refs", JSON, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incidents")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("incident_id", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_alerts_incident_id"), ["incident_id"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.get_bind().exec_driver_sql(V_SENTIMENT_HOURLY_STORIES)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.get_bind().exec_driver_sql(V_SENTIMENT_HOURLY_DOCUMENTS)
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_incident_id"))
        batch_op.drop_column("incident_id")
    op.drop_table("incidents")
