"""The CLI's context object: settings and outside-system clients, each built lazily once.

Commands ask it for what they need (``app.settings``, ``app.runner()``, ``app.connect()`` ...)
so that a command that needs no Redis never fails for a missing Redis setting. Everything it
opens is closed when the Click context closes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import psycopg

from . import db
from .logs import setup_logging
from .runner import Progress, StageRunner, no_progress
from .settings import Settings, load_settings, redact, secret_env_names

if TYPE_CHECKING:  # the clients are imported where they are built: a command pays only for
    import redis  # the outside systems it talks to (cron runs status every few minutes)

    from .adapters.backups import BackupStore
    from .adapters.osrm import OsrmClient


@dataclass
class App:
    config_path: str | None = None
    json: bool = False
    log_format: str = "text"
    verbosity: int = 0
    resources: ExitStack = field(default_factory=ExitStack)
    _settings: Settings | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    def redact(self, text: str) -> str:
        """Mask passwords and secret values (see :func:`settings.redact`); works even before
        (or without) valid settings, from the secret settings' environment variables."""
        try:
            return self.settings.redact(text)
        except Exception:  # settings unreadable (this runs on error paths: never raise here)
            return redact(text, [os.environ[name] for name in secret_env_names()
                                 if os.environ.get(name)])

    def configure_logging(self) -> None:
        """(Re)configure the ``pipeline`` loggers for this verbosity and log format."""
        setup_logging(self.log_format, self.verbosity, self.redact)

    @property
    def database(self) -> db.Database:
        """How to reach PostgreSQL ([database] url, exit 78 if unset): stages take this."""
        d = self.settings.database
        return db.Database(str(self.settings.require("database", "url")),
                           connect_timeout=d.connect_timeout, pooler=d.pooler)

    def connect(
        self, *, autocommit: bool = False, name: str = "pipeline", migrated: bool = False,
        connect_timeout: int | None = None,
    ) -> psycopg.Connection[Any]:
        """A connection closed with the command; ``migrated``: SchemaError (exit 78, naming
        `pipeline db migrate`) unless the schema is current, for commands that read it;
        ``connect_timeout``: at most these seconds, for a command that must answer fast."""
        database = self.database
        if connect_timeout:
            database = replace(
                database, connect_timeout=min(database.connect_timeout, connect_timeout))
        conn = database.connect(name, autocommit=autocommit)
        self.resources.callback(conn.close)
        if migrated:
            db.check_schema(conn)
        return conn

    @property
    def interactive(self) -> bool:
        return sys.stderr.isatty() and self.log_format == "text" and self.verbosity >= 0

    def progress_factory(self) -> Callable[[str, int | None], Any]:
        if not self.interactive or self.json:
            return no_progress
        return rich_progress

    def runner(self) -> StageRunner:
        return StageRunner(
            self.database,
            redact=self.redact,
            progress=self.progress_factory(),
            limits=self.settings.runner.limits(),
        )

    def backups(self, timeout: float | None = None) -> BackupStore:
        """The S3/MinIO backup store named by the [s3] settings (``timeout``: per request and
        no retry, for a command that must answer fast)."""
        s3 = self.settings.s3

        def build() -> BackupStore:
            from .adapters.backups import BackupStore

            endpoint = str(self.settings.require("s3", "endpoint"))
            if timeout:
                return BackupStore.connect(endpoint, s3.access_key, s3.secret_key, s3.bucket,
                                           secure=s3.secure, region=s3.region, timeout=timeout,
                                           retries=0, prefix=s3.prefix)
            return BackupStore.connect(endpoint, s3.access_key, s3.secret_key, s3.bucket,
                                       secure=s3.secure, region=s3.region, prefix=s3.prefix)

        return self.cached(f"backups:{timeout}", build)

    def odata(self) -> Any:
        """The OData client for [odata] (an ``ODataClient``), closed with the invocation."""
        def build() -> Any:
            from .adapters.odata import ODataClient  # lazy: requests only where needed

            client = ODataClient(self.settings.odata)
            self.resources.callback(client.close)
            return client

        return self.cached("odata", build)

    def redis(self, timeout: float | None = None) -> redis.Redis:
        """A Redis client for [redis] url (a cluster client with [redis] cluster; ``timeout``:
        per call, default [redis] socket_timeout); connections are opened lazily by redis-py."""
        seconds = timeout or self.settings.redis.socket_timeout

        def build() -> redis.Redis:
            from .adapters.graph_store import connect

            client = connect(str(self.settings.require("redis", "url")),
                             cluster=self.settings.redis.cluster, socket_timeout=seconds,
                             connect_timeout=min(seconds, 5.0))
            self.resources.callback(client.close)
            return client

        return self.cached(f"redis:{timeout}", build)

    def osrm(self, pool_size: int | None = None) -> OsrmClient:
        """An OSRM client for [osrm] url, pooling one connection per request in flight."""
        def build() -> OsrmClient:
            from .adapters.osrm import OsrmClient

            o = self.settings.osrm
            client = OsrmClient(
                str(self.settings.require("osrm", "url")), profile=o.profile,
                timeout=o.timeout, retries=o.retries, retry_wait_max=o.retry_wait_max,
                pool_size=pool_size or self.settings.match.concurrency,
            )
            self.resources.callback(client.close)
            return client

        return self.cached("osrm", build)

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """Build a client once per invocation (e.g. ``app.cached("redis", ...)``)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


@contextmanager
def rich_progress(description: str, total: int | None = None) -> Iterator[Progress]:
    """A rich progress bar on stderr, for interactive terminals only."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import (
        Progress as RichProgress,
    )

    bar = RichProgress(
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=Console(stderr=True, emoji=False), transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)

        class _P:
            def advance(self, n: int = 1) -> None:
                bar.advance(task, n)

            def set_total(self, total: int | None) -> None:
                bar.update(task, total=total)

        yield _P()
