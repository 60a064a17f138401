"""Secrets for the sinks: an environment variable first, then an Airflow connection.

Airflow is optional here: the connection is looked up only when the environment has no value, and any
failure (Airflow not installed, not configured, no such connection, no task context) just means "no
secret". Values are never logged; callers get them back and must keep them out of messages too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

SLACK_CONN_ID = "finsent_slack"
SMTP_CONN_ID = "finsent_smtp"


@contextmanager
def _logging_kept() -> Iterator[None]:
    """Undo the logging setup that importing Airflow applies (structlog on stdout, its own root level),
    so a CLI that looks up a connection keeps its own format, stream and FINSENT_LOG_LEVEL. Inside an
    Airflow task Airflow is imported already and nothing changes."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    loggers = logging.root.manager.loggerDict.items()
    disabled = {name: lg.disabled for name, lg in loggers if isinstance(lg, logging.Logger)}
    try:
        yield
    finally:
        if handlers and (root.handlers != handlers or root.level != level):
            root.handlers[:] = handlers
            root.setLevel(level)
            for name, was in disabled.items():
                logging.getLogger(name).disabled = was


def airflow_connection(conn_id: str) -> Any | None:
    """The Airflow connection `conn_id` (Task SDK in a task, secrets backends and env outside), or None."""
    with _logging_kept():
        try:
            from airflow.sdk import BaseHook
        except Exception:
            try:
                # Airflow 2 only (Airflow 3's module lacks BaseHook; which codes fire depends on what is installed)
                from airflow.hooks.base import BaseHook  # type: ignore[no-redef,attr-defined,unused-ignore]
            except Exception:
                return None
        try:
            return BaseHook.get_connection(conn_id)
        except Exception as e:
            log.debug("no Airflow connection %s (%s)", conn_id, type(e).__name__)
            return None


def _extra(conn: Any) -> dict[str, Any]:
    try:
        extra = conn.extra_dejson
    except Exception:
        return {}
    return extra if isinstance(extra, dict) else {}


def slack_webhook_url(env_var: str) -> str | None:
    """The Slack incoming-webhook URL from `env_var`, else the `finsent_slack` connection.

    The connection may hold the whole URL in its password (the Slack provider's convention), in its
    extra as `webhook_url`, or split as host (https://hooks.slack.com/services) + password (the token).
    """
    value = os.environ.get(env_var, "").strip() if env_var else ""
    if value:
        return value
    conn = airflow_connection(SLACK_CONN_ID)
    if conn is None:
        return None
    password = (getattr(conn, "password", None) or "").strip()
    host = (getattr(conn, "host", None) or "").strip()
    extra_url = str(_extra(conn).get("webhook_url") or "").strip()
    if password.startswith(("http://", "https://")):
        return password
    if extra_url:
        return extra_url
    if host and password:
        base = host if host.startswith(("http://", "https://")) else f"https://{host}"
        return f"{base.rstrip('/')}/{password.lstrip('/')}"
    return None


def smtp_credentials(env_var: str, user: str | None) -> tuple[str | None, str | None]:
    """(user, password): the password from `env_var`, else the `finsent_smtp` connection (whose login
    also fills in a missing user)."""
    value = os.environ.get(env_var, "") if env_var else ""
    if value:
        return user, value
    conn = airflow_connection(SMTP_CONN_ID)
    if conn is None:
        return user, None
    return user or getattr(conn, "login", None) or None, getattr(conn, "password", None) or None
