"""`make demo` in two clones on one machine: each has its own database, Redis prefix and bucket,
and one clone's `make demo-down` leaves the other's demo alone."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import redis
from click.testing import CliRunner
from psycopg import sql

from devtools import demo
from devtools.cleanup import drop_bucket, drop_prefix
from devtools.services import S3Endpoint


def test_two_state_dirs_get_distinct_names(tmp_path: Path) -> None:
    one = demo.demo_names(tmp_path / "a" / ".local")
    two = demo.demo_names(tmp_path / "b" / ".local")
    assert one.database != two.database
    assert one.redis_prefix != two.redis_prefix
    assert one.bucket != two.bucket
    assert demo.demo_names(tmp_path / "a" / ".local") == one  # stable for one checkout


def _exists(admin: str, database: str) -> bool:
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
    return row is not None


def test_demo_down_leaves_the_other_checkouts_demo(tmp_path: Path, pg_admin_url: str,
                                                   redis_url: str, s3: S3Endpoint,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    states = [tmp_path / "clone-a" / ".local", tmp_path / "clone-b" / ".local"]
    names = [demo.demo_names(state) for state in states]
    client = s3.client()
    with redis.Redis.from_url(redis_url) as r:
        try:
            for state, name in zip(states, names, strict=True):
                state.mkdir(parents=True)
                demo.prepare(state, pg_admin_url, redis_url, s3, "http://127.0.0.1:9",
                             "http://127.0.0.1:9/odata")
                r.set(f"{name.redis_prefix}:graph", "1")
                client.make_bucket(name.bucket)

            monkeypatch.setenv("PIPELINE_LOCAL_DIR", str(states[0]))
            result = CliRunner().invoke(demo.cli, ["down"])
            assert result.exit_code == 0, result.output

            mine, other = names
            assert not _exists(pg_admin_url, mine.database)
            assert r.get(f"{mine.redis_prefix}:graph") is None
            assert not client.bucket_exists(mine.bucket)
            assert _exists(pg_admin_url, other.database)
            assert r.get(f"{other.redis_prefix}:graph") == b"1"
            assert client.bucket_exists(other.bucket)
            assert (states[1] / "demo.env").exists()
        finally:
            with psycopg.connect(pg_admin_url, autocommit=True) as conn:
                for name in names:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(name.database)))
            for name in names:
                drop_prefix(r, name.redis_prefix)
                drop_bucket(client, name.bucket)
