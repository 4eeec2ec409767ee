"""PostgreSQL access: connections, named queries from ``sql/queries/*.sql`` and migrations.

Every psycopg error that leaves this module is wrapped into :class:`DatabaseError` with the
URL's password masked. Queries are named (``-- name: foo``) and take named parameters.
"""

from __future__ import annotations

import hashlib
import logging
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from itertools import zip_longest
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from .errors import (
    ConfigError,
    DatabaseError,
    Interrupted,
    LoginRefused,
    MissingPrivilege,
    ReadOnlyDatabase,
    SchemaError,
    TimedOut,
    service_error,
)

log = logging.getLogger("pipeline.db")

_PACKAGE_DIR = Path(__file__).resolve().parent


def sql_dir() -> Path:
    """``pipeline_cli/sql`` in an installed wheel, the repository's ``sql/`` in a checkout."""
    for candidate in (_PACKAGE_DIR / "sql", _PACKAGE_DIR.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise SchemaError("cannot find the sql/ folder with the migrations")


_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]")


def copy_escape(text: str) -> str:
    """Escape a value for COPY's text format (also the canonical form of a text value)."""
    if _NEEDS_ESCAPE.search(text) is None:
        return text
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def advisory_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key derived from a name."""
    return int.from_bytes(hashlib.sha256(f"pipeline:{name}".encode()).digest()[:8], "big",
                          signed=True)


# The login refused, not the server down: libpq gives no SQLSTATE for a failed connection, so
# the server's English text says it (or libpq's own, for a password it was not given).
_LOGIN_REFUSED = re.compile(r'password authentication failed|no password supplied|'
                            r'(?:Peer|Ident) authentication failed|pg_hba\.conf|'
                            r'is not permitted to log in|role "[^"]*" does not exist')


def connect(
    url: str,
    *,
    application_name: str = "pipeline",
    autocommit: bool = False,
    connect_timeout: int = 10,
    prepare: bool = True,
) -> psycopg.Connection[dict[str, Any]]:
    """Open one connection with dict rows. Wraps connection failures into DatabaseError.

    ``prepare=False`` turns off psycopg's automatic server-side prepared statements (they live
    in a server session, which a transaction pooler hands to other clients).
    """
    try:
        conn = psycopg.connect(
            url,
            autocommit=autocommit,
            row_factory=dict_row,
            application_name=application_name[:63],
            connect_timeout=connect_timeout,
            # Over a database's or role's default (LATIN1 for an old application): files are
            # COPYed as UTF-8 bytes, which were read as Latin-1 and stored garbled, in
            # silence. A startup parameter, so pooler-safe (PgBouncer tracks it per client).
            client_encoding="UTF8",
        )
    except psycopg.Error as exc:
        refused = _LOGIN_REFUSED.search(str(exc)) is not None
        raise service_error(LoginRefused if refused else DatabaseError, "PostgreSQL",
                            _endpoint(url, exc.pgconn), "connection failed", exc) from None
    if not prepare:
        conn.prepare_threshold = None
    if not (conn.info.parameter_status("DateStyle") or "ISO").startswith("ISO"):
        # psycopg reads dates only in ISO style, and a database set to 'SQL, DMY' gave a
        # traceback on every command. PgBouncer keeps DateStyle per client, so this is
        # pooler-safe.
        with wrap_errors("setting DateStyle"):
            conn.execute("SET DateStyle = ISO")
            if not autocommit:
                conn.commit()
    if conn.info.parameter_status("standard_conforming_strings") == "off":
        # The SQL is written for the default since 9.1 (U&'\FFFF', backslashes): off, db
        # migrate failed. PgBouncer keeps it per client too.
        with wrap_errors("setting standard_conforming_strings"):
            conn.execute("SET standard_conforming_strings = on")
            if not autocommit:
                conn.commit()
    # The SQL is written for READ COMMITTED (claims with SKIP LOCKED, a rule that sees rows
    # committed meanwhile): a database defaulting to serializable failed match-gps's claims
    # with 'could not serialize access'. psycopg says so in each BEGIN (pooler-safe).
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    with wrap_errors("reading the session defaults"):
        row = conn.execute(
            "SELECT current_setting('extra_float_digits')::int < 1 AS rounded, "
            "current_setting('default_transaction_isolation') <> 'read committed' AS isolated"
        ).fetchone() or {}
        # Below 1 (a database's or role's default), floats are sent rounded: coordinates
        # read as 6e+01, and gen-virtual planned a third of its stops, in silence. Set only
        # then, to PostgreSQL's default: through a transaction pooler a SET stays on the
        # server session.
        if row.get("rounded"):
            conn.execute("SET extra_float_digits = 1")
        # An autocommit statement sends no BEGIN, so it takes the session's default; not
        # through a pooler, where it would change other clients' transactions.
        if row.get("isolated") and autocommit and prepare:
            conn.execute("SET default_transaction_isolation = 'read committed'")
        if not autocommit:
            conn.commit()
    _OPEN.add(conn)
    return conn


def target(url: str) -> dict[str, str]:
    """The host, port, dbname and user libpq takes for ``url``: the URL's own, else those of
    the PG* environment (PGHOST, PGPORT, PGDATABASE, PGUSER, the PGSERVICE entry) and libpq's
    defaults. A service named in the URL itself is read only when connecting: its parts stay
    unset here (``service`` says which). {} for a malformed URL."""
    try:
        info = {k: str(v) for k, v in conninfo_to_dict(url).items() if v not in (None, "")}
    except psycopg.Error:
        return {}
    if "service" not in info:
        for option in pq.Conninfo.get_defaults():
            key = option.keyword.decode()
            if key in ("host", "hostaddr", "port", "dbname", "user", "service") \
                    and key not in info and option.val:
                info[key] = option.val.decode()
    return info


@dataclass(frozen=True)
class Server:
    """The server libpq is asked to connect to for a URL, told without connecting and never
    with its password: the URL's own parts, else the PG* environment's and libpq's defaults
    (see :func:`target`). The one reading behind error lines and doctor's endpoint column."""

    host: str = ""  # a name, an address or a socket directory; "" is libpq's default socket
    port: str = ""
    dbname: str = ""  # the database, else the user (libpq's default database)
    service: str = ""  # a service the URL names: its parts are read only when connecting
    malformed: bool = False

    @property
    def addresses(self) -> list[tuple[str, str]]:
        """(host, port) of each server: libpq tries the hosts of ``host=h1,h2 port=5432,5433``
        (``postgresql://h1:5432,h2:5433/db``) in turn, and one port is every host's."""
        hosts, ports = self.host.split(","), self.port.split(",")
        if len(ports) == 1:
            ports *= len(hosts)
        return list(zip_longest(hosts, ports, fillvalue=""))


def server(url: str) -> Server:
    """The :class:`Server` of a libpq URL or conninfo string."""
    info = target(url)
    if not info:
        return Server(malformed=True)
    host = info.get("host") or info.get("hostaddr") or ""
    if not host and "service" in info:
        return Server(service=info["service"])
    return Server(host=host, port=info.get("port") or "",
                  dbname=info.get("dbname") or info.get("user") or "")


def _endpoint(url: str, pgconn: pq.abc.PGconn | None = None) -> str:
    """``host:port/dbname`` of a libpq URL or conninfo string (never its password), as libpq
    resolved them when ``pgconn`` (a failed attempt's connection) knows them. A timeout
    leaves no ``pgconn``: then what the URL asked for, and with no host, libpq's default
    socket directory, not localhost (which libpq does not try on Unix)."""
    where = server(url)
    # Of several hosts, pgconn knows only the last one tried, and the error's text is the
    # first one's failure: name them all.
    if pgconn is not None and pgconn.host and len(where.addresses) == 1:
        return (f"{pgconn.host.decode(errors='replace')}:{pgconn.port.decode()}/"
                f"{pgconn.db.decode(errors='replace')}")
    if where.malformed:
        return "(malformed [database] url)"
    if where.service:
        return f"service {where.service}"
    return ", ".join(f"{host or '(default socket directory)'}:{port or 5432}"
                     for host, port in where.addresses) + f"/{where.dbname}"


POOLER_NONE, POOLER_TRANSACTION = "none", "transaction"


@dataclass(frozen=True)
class Database:
    """How the pipeline reaches PostgreSQL: stages and the runner take one of these instead of
    a URL, so one place decides how a connection is made (timeouts, and the pooler mode of a
    managed PostgreSQL). Each call opens a new connection that the caller closes.

    With ``pooler="transaction"`` (PgBouncer ``pool_mode = transaction``) each transaction may
    run on a different server session, shared with other clients: so no server-side prepared
    statements, and no session state (:meth:`set_session` does nothing; code that needs a
    setting uses ``SET LOCAL`` inside its transaction). Locks live in transactions (see
    runner.py), which the pooler keeps on one server session until they end.
    """

    url: str
    connect_timeout: int = 10
    pooler: str = POOLER_NONE

    @property
    def pooled(self) -> bool:
        """Whether a transaction pooler sits in front of PostgreSQL."""
        return self.pooler == POOLER_TRANSACTION

    def connect(self, name: str = "pipeline", *,
                autocommit: bool = False) -> psycopg.Connection[dict[str, Any]]:
        return connect(self.url, application_name=name, autocommit=autocommit,
                       connect_timeout=self.connect_timeout, prepare=not self.pooled)

    def set_session(self, conn: psycopg.Connection[Any], name: str, value: str) -> bool:
        """Set a session parameter for this connection's life when that is safe; returns
        whether it was set. Through a transaction pooler it is not: the setting would stay on
        a server session that other clients then use (e.g. a 5 s statement timeout on someone
        else's gen-virtual), so it is skipped there (an optimisation or a safety net, never
        needed for correctness)."""
        if self.pooled:
            return False
        with wrap_errors(f"setting {name}"):
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        return True

    def __repr__(self) -> str:  # never the password
        return f"Database({_endpoint(self.url)!r})"


# Every connection this process opened and has not dropped, so that a run passing its hard
# limit can cancel its statements on the server (see cancel_statements).
_OPEN: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


def cancel_statements(timeout: float = 5.0) -> int:
    """Ask the server to cancel every statement running on this process's connections.

    Safe to call from a signal handler. The cancelled statement raises QueryCanceled in the
    code that runs it, which rolls its transaction back cleanly. Returns how many were running.
    """
    cancelled = 0
    for conn in list(_OPEN):
        if conn.closed or conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.ACTIVE:
            continue
        cancelled += 1
        try:
            conn.cancel_safe(timeout=timeout)
        except psycopg.Error as exc:  # the server is unreachable: the caller interrupts instead
            log.warning("could not cancel a running statement: %s", _first_line(exc))
    return cancelled


def set_local(conn: psycopg.Connection[Any], name: str, value: str) -> None:
    """Set a parameter for the rest of the open transaction (``SET LOCAL``): pooler-safe, as
    it ends with the transaction."""
    conn.execute("SELECT set_config(%s, %s, true)", (name, value))


def long_transaction(conn: psycopg.Connection[Any]) -> None:
    """Let the open transaction idle as long as it must: for a stage whose one transaction
    waits on another system between its statements (an OData server's pages, S3 uploads), a
    server's or role's ``idle_in_transaction_session_timeout`` must not end it and fail the
    run. Transaction-local (``SET LOCAL``), so pooler-safe; the runner's hard limit per stage
    bounds the run instead. (The runner's lock transaction does the same in ``try_lock``.)"""
    with wrap_errors("starting the transaction"):
        set_local(conn, "idle_in_transaction_session_timeout", "0")


def _first_line(exc: BaseException) -> str:
    """The error's first line, with the server's hint when it gives one (what to change)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    hint = exc.diag.message_hint if isinstance(exc, psycopg.Error) else None
    return f"{line} (hint: {hint.rstrip('.')})" if hint else line


@contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    """Turn psycopg errors raised inside the block into DatabaseError."""
    try:
        yield
    except psycopg.Error as exc:
        if isinstance(exc.__context__, Interrupted | TimedOut):
            # A stop raised in the block, and psycopg, leaving pipeline mode half-way, raised
            # over it ("cannot exit pipeline mode while busy"): the stop is the cause.
            raise exc.__context__ from None
        if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
            raise ReadOnlyDatabase(f"PostgreSQL refused a write while {what}: {READ_ONLY}"
                                   ) from exc
        line = _first_line(exc)
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            # A grant to fix, not an outage the next run outlives.
            raise MissingPrivilege(f"PostgreSQL refused a privilege while {what}: {line} "
                                   "(grant it to the role of [database] url)") from exc
        if isinstance(exc, psycopg.errors.QueryCanceled) and "statement timeout" in line:
            # Whose? A run's hard limit cancels with 'user request'; status sets 5 s itself.
            line += (" (if the database or role sets statement_timeout, raise it or set it to "
                     "0 for the pipeline's role: each run is bounded by [runner] "
                     "timeout_<stage>)")
        elif isinstance(exc, psycopg.errors.LockNotAvailable) and "lock timeout" in line:
            # The pipeline's own lock waits catch this where they set it; here it is a
            # database's or role's default.
            line += (" (another session held a lock this run needed; if the database or role "
                     "sets lock_timeout, raise it or set it to 0 for the pipeline's role: each "
                     "run is bounded by [runner] timeout_<stage>)")
        raise DatabaseError(f"database error while {what}: {line}") from exc


READ_ONLY = ("the database is read-only (a standby, or default_transaction_read_only = on); "
             "[database] url must name the primary")


# ---------------------------------------------------------------- named queries


_NAME_RE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@cache
def _load_queries(module: str) -> dict[str, str]:
    text = (sql_dir() / "queries" / f"{module}.sql").read_text(encoding="utf-8")
    parts = _NAME_RE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        queries[name] = body.strip().rstrip(";").strip()
    return queries


def query(module: str, name: str) -> sql.SQL:
    """The named query ``name`` from ``sql/queries/<module>.sql``, as a composable SQL object."""
    try:
        return sql.SQL(_load_queries(module)[name])  # type: ignore[arg-type,unused-ignore]
    except KeyError:
        raise KeyError(f"no query {name!r} in sql/queries/{module}.sql") from None


# ---------------------------------------------------------------- migrations


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


_MIGRATION_RE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


def migrations() -> list[Migration]:
    found = []
    for path in sorted(sql_dir().glob("*.sql")):
        m = _MIGRATION_RE.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), path))
    versions = [m.version for m in found]
    if len(versions) != len(set(versions)):
        raise SchemaError("two migrations share a number in sql/")
    return found


def latest_version() -> int:
    all_ = migrations()
    return all_[-1].version if all_ else 0


MIGRATE_LOCK = "db-migrate"


@dataclass
class MigrateResult:
    applied: list[str]
    version: int


def migrate(conn: psycopg.Connection[Any], target: int | None = None) -> MigrateResult:
    """Apply every pending migration (up to ``target``, when given: upgrade tests start from
    an older schema) in one transaction under an advisory lock.

    The lock is transaction-scoped and taken before the bookkeeping table is created, so two
    concurrent runs serialise: the second waits, then finds nothing to do.
    """
    applied: list[str] = []
    check_encoding(conn)
    with wrap_errors("migrating"), conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(MIGRATE_LOCK),))
        _check_search_path(conn)  # else a second, empty schema where the search_path points
        # Only when missing: CREATE ... IF NOT EXISTS still needs CREATE on the schema, and a
        # role without it failed a migrate that had nothing to do.
        row = conn.execute(query("runner", "has_schema_migrations")).fetchone() or {}
        if row.get("read_only"):  # a standby given by mistake, even with nothing to do
            raise ReadOnlyDatabase(f"PostgreSQL refused a write while migrating: {READ_ONLY}")
        if not row.get("present"):
            _check_may_create(conn)
            conn.execute(query("runner", "create_schema_migrations"))
        done = {r["version"] for r in conn.execute(query("runner", "applied_migrations"))}
        known = migrations()
        # an older release must not touch a newer schema (a rollback)
        _refuse_newer(done, {m.version for m in known})
        pending = [m for m in known
                   if m.version not in done and (target is None or m.version <= target)]
        if pending:
            _check_may_create(conn)
        for m in pending:
            try:
                conn.execute(m.path.read_text(encoding="utf-8").encode())
            except psycopg.errors.InsufficientPrivilege as exc:
                raise MissingPrivilege(
                    f"role {conn.info.user} may not apply migration {m.version:03d}_{m.name}: "
                    f"{_first_line(exc)} (run pipeline db migrate as the role that owns the "
                    "pipeline's tables)") from exc
            conn.execute(
                query("runner", "record_migration"),
                {"version": m.version, "name": m.name, "checksum": m.checksum},
            )
            applied.append(f"{m.version:03d}_{m.name}")
    return MigrateResult(applied=applied, version=schema_version(conn))


def applied_versions(conn: psycopg.Connection[Any]) -> set[int]:
    """The applied migration numbers; empty for an unmigrated database."""
    with wrap_errors("reading the schema version"):
        row = conn.execute(
            "SELECT to_regclass('schema_migrations') IS NOT NULL AS present"
        ).fetchone()
        versions: set[int] = set()
        if row and row["present"]:
            versions = {r["version"] for r in conn.execute(
                query("runner", "applied_migrations")).fetchall()}
        if not conn.autocommit:
            conn.rollback()
        return versions


def describe_schema(applied: set[int]) -> str:
    """The schema by version, never by count (numbers may have gaps, e.g. no 006):
    ``schema 009 (current)``, ``schema 007, pending 008, 009``, ``schema none, pending ...``."""
    known = {m.version for m in migrations()}
    text = f"schema {max(applied):03d}" if applied else "schema none"
    pending = sorted(known - applied)
    if pending:
        return f"{text}, pending {', '.join(f'{v:03d}' for v in pending)}"
    if applied - known:
        return f"{text} (newer than this pipeline: {max(known):03d})"
    return f"{text} (current)"


def check_encoding(conn: psycopg.Connection[Any]) -> None:
    """ConfigError unless the database is in UTF8: a LATIN1 one refuses a Cyrillic stop name,
    and a SQL_ASCII one stores bytes without checking them (other clients read mojibake);
    migrate failed half-way into its SQL with the server's conversion error, exit 1."""
    encoding = conn.info.parameter_status("server_encoding") or "UTF8"
    if encoding != "UTF8":
        raise ConfigError(
            f"database {conn.info.dbname} is in encoding {encoding}, which cannot hold every "
            "stop and device name (Cyrillic, emoji): the pipeline needs a UTF8 database "
            "(CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)")


def _check_may_create(conn: psycopg.Connection[Any]) -> None:
    """MissingPrivilege, naming the role, the schema and the two remedies, when the role may
    not create tables where the migrations would make them: PostgreSQL 15 no longer grants
    CREATE on schema public to every role, and migrate failed with 'permission denied for
    schema public', exit 1."""
    row = conn.execute(query("runner", "may_create")).fetchone() or {}
    if row.get("may_create"):
        return
    role, schema = row.get("role") or conn.info.user, row.get("schema")
    if schema is None:
        raise MissingPrivilege(
            f"the search_path ({row.get('search_path')}) names no schema that exists, so "
            "pipeline db migrate has nowhere to create the tables: create the schema, or reset "
            "the database's or role's search_path")
    remedy = (f"make it the database's owner (ALTER DATABASE ... OWNER TO {role}), or "
              if schema == "public" else "")
    raise MissingPrivilege(
        f"role {role} may not create tables in schema {schema}"
        + (" (PostgreSQL 15 no longer lets every role create there)" if schema == "public"
           else "")
        + f": {remedy}GRANT CREATE ON SCHEMA {schema} TO {role}")


def _check_search_path(conn: psycopg.Connection[Any]) -> None:
    """SchemaError when the pipeline's tables exist in a schema the search_path does not
    reach: 'not migrated; run pipeline db migrate' led to a second, empty schema."""
    rows = conn.execute(query("runner", "tables_elsewhere")).fetchall()
    if rows:
        names = ", ".join(r["schema"] for r in rows)
        raise SchemaError(
            f"the pipeline's tables are in schema {names}, which the search_path "
            f"({rows[0]['search_path']}) does not reach: reset the database's or role's "
            f"search_path, or name the schema in [database] url "
            f"(options=-csearch_path={rows[0]['schema']})")


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The highest applied migration, 0 for an unmigrated database."""
    return max(applied_versions(conn), default=0)


def deployment_id(conn: psycopg.Connection[Any]) -> str | None:
    """This database's identity as a deployment (``deployment.id``, sql/028): it claims the
    Redis prefix with it. None before migration 028, or when the row was deleted by hand.
    Reads in the caller's transaction."""
    with wrap_errors("reading the deployment identity"):
        present = conn.execute(query("runner", "has_deployment")).fetchone()
        if not (present and present["present"]):
            return None
        row = conn.execute(query("runner", "deployment_id")).fetchone()
    return str(row["id"]) if row else None


def require_deployment_id(conn: psycopg.Connection[Any]) -> str:
    """:func:`deployment_id`, or SchemaError for a database without one (a command that
    writes graph keys must not claim a prefix without it)."""
    identity = deployment_id(conn)
    if identity is None:
        raise SchemaError("the table deployment holds no row (migration 028 made one; deleted "
                          "by hand?): INSERT INTO deployment DEFAULT VALUES gives this database "
                          "a new identity")
    return identity


def check_schema(conn: psycopg.Connection[Any]) -> int:
    """Raise SchemaError unless every migration this code knows, and no other, is applied."""
    have = applied_versions(conn)
    known = {m.version for m in migrations()}
    if not have:
        with wrap_errors("reading the schema version"):
            _check_search_path(conn)
            if not conn.autocommit:
                conn.rollback()
        raise SchemaError("the database is not migrated; run `pipeline db migrate`")
    if known - have:
        pending = ", ".join(f"{v:03d}" for v in sorted(known - have))
        raise SchemaError(
            f"the database schema is outdated (pending migrations {pending}); "
            "run `pipeline db migrate`"
        )
    _refuse_newer(have, known)
    return max(have)


def _refuse_newer(have: set[int], known: set[int]) -> None:
    """SchemaError when migrations this code does not know (``known``: its versions) are
    applied: a newer release migrated the database, and going back needs a restore from
    before it."""
    if have - known:
        raise SchemaError(
            f"the database schema (version {max(have)}) is newer than this pipeline knows "
            f"({max(known)}); upgrade pipeline before running stages"
        )
