"""A database as a standby shows it to the pipeline: read-only, with a run that the primary
has in progress (its lock is the primary's, so it is not seen here)."""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg.sql


def as_a_standby(conn: psycopg.Connection[Any], database_url: str,
                 stage: str = "match-gps") -> None:
    """Record a ``running`` run of ``stage`` held by no lock, then make the database
    read-only (``default_transaction_read_only``, for new sessions)."""
    conn.execute("INSERT INTO stage_runs (run_id, stage, host, pid, backend_pid, "
                 "backend_start, status) VALUES (gen_random_uuid(), %s, 'primary', 1, 1, "
                 "now(), 'running')", (stage,))
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    conn.execute(psycopg.sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on")
                 .format(psycopg.sql.Identifier(name)))
