"""Benchmarks: each bench_<name>.py measures one goal as a ratio, side by side, in one run.

`make bench` (``python -m bench``) runs them all and rewrites docs/benchmarks.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from pipeline_cli import db


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A new, migrated database on the server of ``admin_url``; dropped afterwards."""
    name = f"pipeline_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    try:
        with db.connect(url, autocommit=True) as conn:
            db.migrate(conn)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
