"""The reliability suite's harness: many ``pipeline`` processes at once, SIGKILL at chosen
moments, and checkers for the invariants the pipeline promises, read from the real servers.

Used by ``tests/reliability/`` and ``bench/bench_reliability.py``. A :class:`Sandbox` gives
one isolated world (database, Redis prefix, S3 bucket, OData fixture server) and the
``PIPELINE_*`` environment for subprocesses; the ``check_*`` functions return a list of
human-readable problems (empty = the invariant holds), so a failing test says what broke.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import redis
from psycopg import sql

from devtools.cleanup import drop_bucket, drop_prefix
from devtools.odata_server import ODataServer, sample_network
from devtools.services import LocalServices, S3Endpoint
from pipeline_cli import db
from pipeline_cli.adapters.backups import BackupStore

__all__ = [
    "ForkServer", "KillReport", "ProcResult", "Sandbox", "add_gps_work", "check_all",
    "check_datasets", "check_gps", "check_graph", "check_runs", "check_virtual", "find_secrets",
    "kill_trials", "password_role", "pipeline_exe", "restart_postgres", "run_concurrently",
    "run_killed", "run_pipeline", "run_released", "status_json", "stop_restarted_postgres",
]


# ============================================================================ processes


def pipeline_exe() -> str:
    """The installed ``pipeline`` script next to this interpreter."""
    return str(Path(sys.executable).with_name("pipeline"))


def clean_env(env: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without any ``PIPELINE_*`` variable, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return {**base, **env}


# Every ProcResult made lately, so a suite-wide check (tests/reliability/conftest.py) can scan
# all output for secrets without each test collecting it.
OBSERVED: collections.deque[ProcResult] = collections.deque(maxlen=5000)


@dataclass
class ProcResult:
    """One finished ``pipeline`` process. ``elapsed`` is measured from its own spawn."""

    args: list[str]
    exit_code: int
    elapsed: float
    stdout: str
    stderr: str
    started: float  # time.monotonic() at spawn
    killed: bool = False  # SIGKILLed by the harness
    killed_after: float | None = None  # seconds after spawn

    def __post_init__(self) -> None:
        OBSERVED.append(self)

    @property
    def ended(self) -> float:
        return self.started + self.elapsed

    def json(self) -> dict[str, Any]:
        """stdout parsed as the one JSON object ``--json`` prints."""
        data: dict[str, Any] = json.loads(self.stdout)
        return data

    def describe(self) -> str:
        tail = self.stderr.strip().splitlines()[-3:]
        return (f"`pipeline {' '.join(self.args)}` exit {self.exit_code} in "
                f"{self.elapsed:.2f} s{' (killed)' if self.killed else ''}: {' | '.join(tail)}")


class _Reader(threading.Thread):
    """Collects one pipe line by line and signals when a line matches ``pattern``."""

    def __init__(self, pipe: Any, pattern: re.Pattern[str] | None) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.pattern = pattern
        self.lines: list[str] = []
        self.matched = threading.Event()

    def run(self) -> None:
        for line in iter(self.pipe.readline, ""):
            self.lines.append(line)
            if self.pattern is not None and self.pattern.search(line):
                self.matched.set()
        self.pipe.close()

    @property
    def text(self) -> str:
        return "".join(self.lines)


def spawn(args: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([pipeline_exe(), *args], env=clean_env(env), text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", errors="replace")


def run_pipeline(args: Sequence[str], env: Mapping[str, str], *, timeout: float = 300
                 ) -> ProcResult:
    """Run ``pipeline ARGS`` to completion."""
    started = time.monotonic()
    proc = spawn(args, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[harness] timed out after {timeout} s and was killed"
    return ProcResult(list(args), proc.returncode, time.monotonic() - started, out, err,
                      started)


def run_concurrently(argvs: Sequence[Sequence[str]], env: Mapping[str, str], *,
                     timeout: float = 300) -> list[ProcResult]:
    """Start every ``pipeline`` invocation at (nearly) the same moment and wait for all.

    One thread per process spawns it after a shared barrier and collects its output, so each
    result's ``elapsed`` is that process's own wall time from its spawn.
    """
    barrier = threading.Barrier(len(argvs))
    results: list[ProcResult | None] = [None] * len(argvs)

    def one(i: int, args: Sequence[str]) -> None:
        barrier.wait()
        results[i] = run_pipeline(args, env, timeout=timeout)

    threads = [threading.Thread(target=one, args=(i, a), daemon=True)
               for i, a in enumerate(argvs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


# Imports the CLI and every adapter and stage module (which commands import lazily), says so,
# waits for the go line on stdin, then runs the command: the same code path as the installed
# script, with Python's import time (seconds on a busy 2-core machine, most of it
# numpy/scipy/minio/requests) kept out of the measured window, and so is the interpreter's
# shutdown: the child reports when its command started and returned (CLOCK_MONOTONIC is
# system-wide, so the parent can compare it with its own clock).
_PRELOADED = (
    "import importlib, pkgutil, sys, time\n"
    "from pipeline_cli.cli import main\n"
    "import pipeline_cli.adapters as a, pipeline_cli.stages as s\n"
    "for pkg in (a, s):\n"
    "    for m in pkgutil.iter_modules(pkg.__path__):\n"
    "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
    "sys.stderr.write('[harness] ready\\n'); sys.stderr.flush()\n"
    "sys.stdin.readline()\n"
    "go = time.monotonic()\n"
    "sys.argv[0] = 'pipeline'\n"
    "try:\n"
    "    main()\n"
    "finally:\n"
    "    sys.stderr.write(f'[harness] ran {go} {time.monotonic()}\\n'); sys.stderr.flush()\n"
)


def run_released(argvs: Sequence[Sequence[str]], env: Mapping[str, str], *,
                 timeout: float = 300) -> list[ProcResult]:
    """Like :func:`run_concurrently`, but every process first imports the CLI and waits; all
    are then released at one instant. ``started``/``elapsed`` are the command's own start and
    wall time inside the child (from reading the release to ``main()`` returning).

    This measures the command itself (settings, connection, lock, work) in real, separate
    processes racing for real PostgreSQL locks, without the interpreter start-up cost.
    """
    procs = [subprocess.Popen([sys.executable, "-c", _PRELOADED, *a], env=clean_env(env),
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
             for a in argvs]
    readers = [(_Reader(p.stdout, None), _Reader(p.stderr, re.compile(r"^\[harness\] ready")))
               for p in procs]
    for out, err in readers:
        out.start()
        err.start()
    deadline = time.monotonic() + timeout
    for p, (_, err) in zip(procs, readers, strict=True):
        while not err.matched.wait(0.05):
            if p.poll() is not None or time.monotonic() > deadline:
                for q in procs:
                    with contextlib.suppress(ProcessLookupError):
                        q.kill()
                    q.wait()
                raise RuntimeError(f"a preloaded pipeline did not start: {err.text[-500:]}")
    ends: list[float] = [0.0] * len(procs)

    def wait(i: int) -> None:
        try:
            procs[i].wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            procs[i].kill()
            procs[i].wait()
        ends[i] = time.monotonic()

    waiters = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(len(procs))]
    released = time.monotonic()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
    for t in waiters:
        t.start()
    for p in procs:
        assert p.stdin is not None
        with contextlib.suppress(OSError):
            p.stdin.close()
    results = []
    for i, (p, (out, err)) in enumerate(zip(procs, readers, strict=True)):
        waiters[i].join()
        out.join(10)
        err.join(10)
        stderr = "".join(line for line in err.lines if not line.startswith("[harness] "))
        ran = [line.split()[2:4] for line in err.lines if line.startswith("[harness] ran ")]
        go, done = (float(ran[0][0]), float(ran[0][1])) if ran else (released, ends[i])
        results.append(ProcResult(list(argvs[i]), p.returncode, done - go, out.text,
                                  stderr, go))
    return results


def run_killed(args: Sequence[str], env: Mapping[str, str], *, delay: float | None = None,
               when_line: str | None = None, after_line: float = 0.0,
               timeout: float = 120) -> ProcResult:
    """Run ``pipeline ARGS`` and SIGKILL it ``delay`` seconds after spawn, or ``after_line``
    seconds after a stderr line matching the regex ``when_line`` first appears (whichever
    comes first). If it finishes before, it is not killed (``killed`` is False)."""
    pattern = re.compile(when_line) if when_line else None
    started = time.monotonic()
    proc = spawn(args, env)
    out_reader = _Reader(proc.stdout, None)
    err_reader = _Reader(proc.stderr, pattern)
    out_reader.start()
    err_reader.start()
    deadline = started + (delay if delay is not None else timeout)
    killed_at: float | None = None
    while proc.poll() is None:
        line_seen = pattern is not None and err_reader.matched.is_set()
        if line_seen or time.monotonic() >= deadline:
            if line_seen and after_line:
                time.sleep(after_line)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.monotonic() - started
            break
        time.sleep(0.002)
    code = proc.wait()
    out_reader.join(10)
    err_reader.join(10)
    killed = killed_at is not None and code == -signal.SIGKILL
    return ProcResult(list(args), code, time.monotonic() - started, out_reader.text,
                      err_reader.text, started, killed=killed,
                      killed_after=killed_at if killed else None)


def status_json(env: Mapping[str, str], *, timeout: float = 60) -> dict[str, Any]:
    """``pipeline status --json`` as the installed script prints it."""
    res = run_pipeline(["status", "--json"], env, timeout=timeout)
    try:
        return res.json()
    except json.JSONDecodeError as exc:
        raise AssertionError(f"status --json printed no JSON: {res.describe()}") from exc


# ============================================================================ sandbox


def _replace_db(url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=name)


def role_url(admin_url: str, role: str, password: str, dbname: str) -> str:
    """``postgresql://role:password@host:port/dbname`` on the admin URL's server. TCP to
    127.0.0.1, so a password is asked for wherever pg_hba says md5/scram."""
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    host = str(info.get("host") or "127.0.0.1")
    host = "127.0.0.1" if host.startswith("/") or host == "localhost" else host
    return (f"postgresql://{quote(role, safe='')}:{quote(password, safe='')}@{host}:"
            f"{info.get('port') or 5432}/{quote(dbname, safe='')}")


@contextlib.contextmanager
def password_role(admin_url: str) -> Iterator[tuple[str, str, str]]:
    """A login role with a random password and a migrated template database it owns:
    yields (role, password, template). Databases cloned from it stay owned by the role."""
    import secrets as _secrets

    role = f"pipeline_sec_{uuid.uuid4().hex[:8]}"
    password = "pw-" + _secrets.token_urlsafe(18)
    template = f"pipeline_rtpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(template), sql.Identifier(role)))
    try:
        with db.connect(role_url(admin_url, role, password, template), autocommit=True) as conn:
            db.migrate(conn)
        yield role, password, template
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(template)))
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@dataclass(repr=False)
class Sandbox:
    """One isolated world on the real servers: a migrated database, a Redis prefix, an S3
    bucket, and (optionally) an OData fixture server and OSRM. :meth:`close` removes all.

    ``env`` is the ``PIPELINE_*`` environment for the CLI; add to it freely.
    """

    services: LocalServices
    odata_rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
    osrm_url: str | None = None
    template: str | None = None  # a migrated database to clone (faster than migrating)
    role: str | None = None  # owner of the database; the CLI connects as it, with password
    role_password: str | None = None
    admin_url: str = ""
    database: str = ""
    database_url: str = ""
    redis_url: str = ""
    prefix: str = ""
    bucket: str = ""
    s3: S3Endpoint | None = None
    odata: ODataServer | None = None
    env: dict[str, str] = field(default_factory=dict)
    _clients: list[Any] = field(default_factory=list)
    _conn: psycopg.Connection[dict[str, Any]] | None = None
    _redis: redis.Redis | None = None

    def __post_init__(self) -> None:
        self.admin_url = self.admin_url or self.services.postgres()
        self.database = f"pipeline_r_{uuid.uuid4().hex[:12]}"
        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database))
        if self.template:
            create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(self.template))
        if self.role:
            create += sql.SQL(" OWNER {}").format(sql.Identifier(self.role))
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(create)
        self.database_url = (role_url(self.admin_url, self.role, self.role_password or "",
                                      self.database) if self.role
                             else _replace_db(self.admin_url, self.database))
        if not self.template:
            with db.connect(self.database_url, autocommit=True) as conn:
                db.migrate(conn)
        self.redis_url = self.services.redis()
        self.prefix = f"pr{uuid.uuid4().hex[:10]}"
        self.s3 = self.services.s3()
        self.bucket = f"pr-{uuid.uuid4().hex[:12]}"
        self.env.update({
            "PIPELINE_DATABASE_URL": self.database_url,
            "PIPELINE_REDIS_URL": self.redis_url,
            "PIPELINE_REDIS_PREFIX": self.prefix,
            "PIPELINE_S3_ENDPOINT": self.s3.endpoint,
            "PIPELINE_S3_ACCESS_KEY": self.s3.access_key,
            "PIPELINE_S3_SECRET_KEY": self.s3.secret_key,
            "PIPELINE_S3_BUCKET": self.bucket,
            "PIPELINE_S3_SECURE": "true" if self.s3.secure else "false",
            # fail fast in tests: short retry waits, short timeouts
            "PIPELINE_ODATA_BACKOFF_BASE": "0.01",
            "PIPELINE_ODATA_BACKOFF_MAX": "0.2",
            "PIPELINE_ODATA_READ_TIMEOUT": "5",
            "PIPELINE_ODATA_CONNECT_TIMEOUT": "2",
            "PIPELINE_DATABASE_CONNECT_TIMEOUT": "5",
            "PIPELINE_REDIS_SOCKET_TIMEOUT": "5",
        })
        if self.odata_rows is not None:
            self.start_odata(self.odata_rows)
        if self.osrm_url:
            self.env["PIPELINE_OSRM_URL"] = self.osrm_url

    def __repr__(self) -> str:  # short: it shows in hypothesis' falsifying examples
        return f"Sandbox(database={self.database!r}, prefix={self.prefix!r})"

    @property
    def secrets(self) -> list[str]:
        """The secret values this sandbox's environment holds."""
        found = [v for k, v in self.env.items()
                 if v and any(w in k for w in ("PASSWORD", "SECRET", "TOKEN", "PING_URL"))]
        if self.role_password:
            found.append(self.role_password)
        return sorted(set(found))

    def start_odata(self, rows: Mapping[str, Sequence[Mapping[str, Any]]], **kw: Any
                    ) -> ODataServer:
        if self.odata is not None:
            self.odata.stop()
        self.odata = ODataServer(rows, **kw).start()
        self.env["PIPELINE_ODATA_URL"] = self.odata.url
        return self.odata

    # ------------------------------------------------------------------ clients

    def connect(self) -> psycopg.Connection[dict[str, Any]]:
        """The sandbox's own autocommit session (one, reopened if it was closed)."""
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.database_url, autocommit=True,
                                    application_name="pipeline reliability check")
            self._clients.append(self._conn)
        return self._conn

    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url)
            self._clients.append(self._redis)
        return self._redis

    def backups(self) -> BackupStore:
        assert self.s3 is not None
        return BackupStore.connect(self.s3.endpoint, self.s3.access_key, self.s3.secret_key,
                                   self.bucket, secure=self.s3.secure, region=self.s3.region)

    def run(self, *args: str, timeout: float = 300) -> ProcResult:
        return run_pipeline(args, self.env, timeout=timeout)

    def check(self, **kw: Any) -> list[str]:
        """Every invariant against this sandbox's servers (see :func:`check_all`)."""
        conn = self.connect()
        client = self.redis()
        return check_all(conn, backups=self.backups(), redis_client=client,
                         prefix=self.prefix, **kw)

    def reset_tables(self, tables: Iterable[str] | None = None) -> None:
        """Empty the data tables (fast reuse of one database across hypothesis examples)."""
        names = list(tables or ("cached_polylines", "gps_points", "processing_batches",
                                "graph_versions", "virtual_frequencies", "virtual_routes",
                                "virtual_stops", "virtual_generations", "flights", "routes",
                                "stops", "datasets", "stage_runs"))
        with db.connect(self.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
                sql.SQL(", ").join(sql.Identifier(n) for n in names)))

    # ------------------------------------------------------------------ cleanup

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        self._conn = self._redis = None
        if self.odata is not None:
            self.odata.stop()
            self.odata = None
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(self.database)))
        client = redis.Redis.from_url(self.redis_url)
        try:
            drop_prefix(client, self.prefix)
        finally:
            client.close()
        assert self.s3 is not None
        drop_bucket(self.s3.client(), self.bucket)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def small_network(n_stops: int = 30, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """A small sample OData network: cheap to sync, generate and build."""
    return sample_network(n_stops, seed)


# ============================================================================ invariants


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rows(conn: psycopg.Connection[Any], query: str, params: Mapping[str, Any] | None = None
          ) -> list[dict[str, Any]]:
    return conn.execute(query, params or {}).fetchall()


def check_datasets(conn: psycopg.Connection[Any], backups: BackupStore | None) -> list[str]:
    """No partial dataset: every ``datasets`` row has its complete backup (manifest, written
    last, naming the same hash), at most one is active, and the read model holds exactly the
    active dataset's counts."""
    problems: list[str] = []
    rows = _rows(conn, "SELECT version, hash, counts, backup_prefix, active FROM datasets "
                       "ORDER BY seq")
    if sum(1 for r in rows if r["active"]) > 1:
        problems.append("more than one active dataset")
    if backups is not None:
        for r in rows:
            key = f"{r['backup_prefix']}manifest.json"
            if not backups.exists(key):
                problems.append(f"dataset {r['version']}: no backup manifest {key}")
                continue
            manifest = backups.get_json(key)
            if manifest.get("hash") != r["hash"]:
                problems.append(f"dataset {r['version']}: backup manifest hash differs")
    model = {t: _rows(conn, f"SELECT count(*) AS n FROM {t}")[0]["n"]  # noqa: S608
             for t in ("stops", "routes", "flights")}
    active = [r for r in rows if r["active"]]
    if active:
        counts = active[0]["counts"]
        for t, n in model.items():
            if counts.get(t) != n:
                problems.append(f"read model {t} has {n} rows, active dataset "
                                f"{active[0]['version']} says {counts.get(t)}")
    elif any(model.values()):
        problems.append(f"read model holds rows {model} but no dataset is active")
    return problems


def check_virtual(conn: psycopg.Connection[Any], backups: BackupStore | None) -> list[str]:
    """The virtual tables hold exactly the newest generation, whose backup is complete."""
    problems: list[str] = []
    gens = _rows(conn, "SELECT id, dataset_version, counts, backup_prefix "
                       "FROM virtual_generations ORDER BY id DESC")
    model = {t: _rows(conn, f"SELECT count(*) AS n FROM {t}")[0]["n"]  # noqa: S608
             for t in ("virtual_stops", "virtual_routes", "virtual_flights")}
    if not gens:
        if any(model.values()):
            problems.append(f"virtual tables hold rows {model} but there is no generation")
        return problems
    newest = gens[0]
    for t, n in model.items():
        if newest["counts"].get(t) != n:
            problems.append(f"{t} has {n} rows, generation {newest['id']} says "
                            f"{newest['counts'].get(t)}")
    frequencies = {r["generation_id"] for r in _rows(
        conn, "SELECT generation_id FROM virtual_frequencies")}
    if frequencies != {newest["id"]}:
        problems.append(f"virtual_frequencies holds generations {sorted(frequencies)}, not "
                        f"the newest, {newest['id']}")
    if backups is not None and newest["backup_prefix"]:
        key = f"{newest['backup_prefix']}manifest.json"
        if not backups.exists(key):
            problems.append(f"virtual generation {newest['id']}: no backup manifest {key}")
    return problems


def check_graph(conn: psycopg.Connection[Any], client: redis.Redis | None, prefix: str,
                backups: BackupStore | None, *, settled: bool = True) -> list[str]:
    """No half graph: at most one active row; every row's export is in S3; the Redis pointer
    names a complete version (meta present, one adjacency key per node, node count equal to
    its ``graph_versions`` row).

    ``settled`` (after a run that finished) also asks that row to be the active one. Right
    after a kill -9 it may not be yet: the pointer switch is build-graph's commit point, and a
    run killed between the switch and its COMMIT leaves PostgreSQL one step behind until the
    next build-graph reconciles it (``status`` shows the mismatch meanwhile)."""
    problems: list[str] = []
    rows = {r["version"]: r for r in _rows(
        conn, "SELECT version, nodes, edges, export_key, active FROM graph_versions")}
    active_rows = [v for v, r in rows.items() if r["active"]]
    if len(active_rows) > 1:
        problems.append(f"more than one active graph version: {active_rows}")
    if backups is not None:
        for v, r in rows.items():
            if not backups.exists(r["export_key"]):
                problems.append(f"graph {v}: export {r['export_key']} missing in S3")
    if client is None:
        return problems
    raw = client.get(f"{prefix}:graph:active")
    pointer = raw.decode() if isinstance(raw, bytes) else raw
    if pointer is None:
        if active_rows:
            problems.append(f"graph {active_rows[0]} is active in PostgreSQL but the Redis "
                            "pointer is unset")
        return problems
    raw_meta: dict[Any, Any] = client.hgetall(f"{prefix}:graph:{pointer}:meta")
    meta = {_text(k): _text(v) for k, v in raw_meta.items()}
    if not meta:
        problems.append(f"Redis pointer names {pointer}, which has no meta (incomplete)")
        return problems
    adj = sum(1 for _ in client.scan_iter(match=f"{prefix}:graph:{pointer}:adj:*", count=2000))
    if int(meta.get("nodes", -1)) != adj:
        problems.append(f"graph {pointer}: meta says {meta.get('nodes')} nodes, Redis holds "
                        f"{adj} adjacency keys")
    row = rows.get(pointer)
    if row is None:
        problems.append(f"Redis pointer names {pointer}, which graph_versions does not know")
    else:
        if row["nodes"] != adj:
            problems.append(f"graph {pointer}: graph_versions says {row['nodes']} nodes, Redis "
                            f"holds {adj}")
        if settled and not row["active"]:
            problems.append(f"Redis pointer names {pointer}, but graph_versions marks "
                            f"{active_rows or 'none'} active")
    return problems


def check_gps(conn: psycopg.Connection[Any]) -> list[str]:
    """No lost point, none matched twice: batches of a device never overlap, so a point lies
    in at most one; a processed point is in a completed (or too_short) batch that read it; a
    finished batch counts the points of its range and has exactly the polylines it
    recorded; no two polylines of a device overlap in time."""
    problems: list[str] = []
    overlapping = _rows(conn, """
        SELECT count(*) AS n FROM processing_batches a JOIN processing_batches b
          ON a.device_id = b.device_id AND a.batch_id < b.batch_id
         AND a.start_time <= b.end_time AND b.start_time <= a.end_time""")
    if overlapping[0]["n"]:
        problems.append(f"{overlapping[0]['n']} pair(s) of batches of one device overlap "
                        "(a point in two batches)")
    bad = _rows(conn, """
        SELECT processed, batch_status, count(*) AS n FROM gps_point_status
        WHERE processed AND batch_status NOT IN ('completed', 'too_short')
        GROUP BY 1, 2""")
    for r in bad:
        problems.append(f"{r['n']} point(s) processed={r['processed']} in a batch with status "
                        f"{r['batch_status']}")
    counts = _rows(conn, """
        SELECT b.batch_id, b.coordinate_count, count(p.device_id) AS n
        FROM processing_batches b LEFT JOIN gps_points p
          ON p.device_id = b.device_id AND p.recorded_at BETWEEN b.start_time AND b.end_time
        WHERE b.status IN ('completed', 'too_short', 'dead')
        GROUP BY b.batch_id HAVING count(p.device_id) <> b.coordinate_count LIMIT 5""")
    for r in counts:
        problems.append(f"batch {r['batch_id']} says {r['coordinate_count']} points, holds "
                        f"{r['n']}")
    lines = _rows(conn, """
        SELECT b.batch_id, b.status, b.polyline_count, count(c.id) AS n
        FROM processing_batches b LEFT JOIN cached_polylines c ON c.batch_id = b.batch_id
        GROUP BY b.batch_id
        HAVING (b.status = 'completed' AND count(c.id) <> b.polyline_count)
            OR (b.status <> 'completed' AND count(c.id) > 0)
        LIMIT 5""")
    for r in lines:
        problems.append(f"batch {r['batch_id']} ({r['status']}) records {r['polyline_count']} "
                        f"polylines, cached_polylines holds {r['n']}")
    orphans = _rows(conn, """
        SELECT count(*) AS n FROM cached_polylines c
        WHERE c.batch_id IS NULL
           OR NOT EXISTS (SELECT 1 FROM processing_batches b WHERE b.batch_id = c.batch_id)""")
    if orphans[0]["n"]:
        problems.append(f"{orphans[0]['n']} polyline(s) of no known batch")
    overlap = _rows(conn, """
        SELECT count(*) AS n FROM cached_polylines a JOIN cached_polylines b
          ON a.device_id = b.device_id AND a.id < b.id
         AND a.start_time < b.end_time AND b.start_time < a.end_time""")
    if overlap[0]["n"]:
        problems.append(f"{overlap[0]['n']} pair(s) of polylines of one device overlap in time "
                        "(matched twice)")
    return problems


def check_runs(conn: psycopg.Connection[Any]) -> list[str]:
    """Run history: no run is left ``running`` by a process that is gone (reaping happens at
    the next run or status), and every finished row has a finish time."""
    rows = _rows(conn, """
        SELECT run_id, stage, status FROM stage_runs
        WHERE (status <> 'running' AND finished_at IS NULL)
           OR status NOT IN ('running', 'success', 'noop', 'skipped', 'failed', 'crashed')""")
    return [f"run {r['run_id']} of {r['stage']}: inconsistent status {r['status']}"
            for r in rows]


def check_all(conn: psycopg.Connection[Any], *, backups: BackupStore | None = None,
              redis_client: redis.Redis | None = None, prefix: str = "pipeline",
              settled: bool = True) -> list[str]:
    """Every invariant above, as one list of problems (``settled``: see :func:`check_graph`)."""
    return [*check_datasets(conn, backups), *check_virtual(conn, backups),
            *check_graph(conn, redis_client, prefix, backups, settled=settled),
            *check_gps(conn),
            *check_runs(conn)]


# ============================================================================ secrets


def find_secrets(text: str, secrets: Iterable[str], where: str) -> list[str]:
    """Problems for every secret value found in ``text`` (values under 6 chars are skipped:
    too short to tell a leak from chance)."""
    return [f"secret #{i} ({len(s)} chars) appears in {where}"
            for i, s in enumerate(secrets) if len(s) >= 6 and s in text]


def table_text(conn: psycopg.Connection[Any], table: str) -> str:
    """Every column of every row of ``table`` as one text (for secret scanning)."""
    rows = conn.execute(sql.SQL("SELECT t::text AS row FROM {} t").format(
        sql.Identifier(table))).fetchall()
    return "\n".join(str(r["row"]) for r in rows)


# ============================================================================ fork server

# A process that imports the CLI once and forks a child per command. Each child is a real,
# separate ``pipeline`` process (own PID, own connections, opened after the fork; SIGKILL
# ends it like any other) that costs milliseconds instead of seconds of imports, so kill -9
# trials can run by the hundred. Protocol: JSON lines on stdin (jobs) and stdout (events).
_FORKSERVER = r'''
import importlib, json, os, pkgutil, select, sys, time
from pipeline_cli.cli import main
import pipeline_cli.adapters as a, pipeline_cli.stages as s
for pkg in (a, s):
    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{m.name}")
events = sys.stdout
events.write(json.dumps({"ready": os.getpid()}) + "\n"); events.flush()
children = {}
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 0.005 if children else 0.5)
    if ready:
        line = sys.stdin.readline()
        if not line:
            break
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd, path, flags in ((1, job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                        (2, job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                        (0, os.devnull, os.O_RDONLY)):
                    new = os.open(path, flags, 0o600)
                    os.dup2(new, fd)
                    os.close(new)
                os.setsid()
                os.environ.clear()
                os.environ.update(job["env"])
                sys.argv = ["pipeline", *job["argv"]]
                try:
                    main()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        children[pid] = job["id"]
        events.write(json.dumps({"id": job["id"], "pid": pid, "at": time.monotonic()}) + "\n")
        events.flush()
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            events.write(json.dumps({"id": children.pop(pid), "exit": os.waitstatus_to_exitcode(
                status), "at": time.monotonic()}) + "\n")
            events.flush()
'''


class ForkServer:
    """Runs ``pipeline`` commands as children forked from one pre-imported process.

    ``run`` / ``run_killed`` mirror :func:`run_pipeline` / :func:`run_killed`. Output goes to
    files under ``workdir``; ``close`` (or the context manager) stops the server.
    """

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen([sys.executable, "-c", _FORKSERVER], text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=clean_env({}))
        self._cond = threading.Condition()
        self._events: dict[str, dict[str, Any]] = {}
        self._ready = threading.Event()
        self._seq = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(120):
            self.close()
            raise RuntimeError("the pipeline fork server did not start")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            event = json.loads(line)
            if "ready" in event:
                self._ready.set()
                continue
            with self._cond:
                self._events.setdefault(event["id"], {}).update(
                    {"pid": event["pid"], "started": event["at"]} if "pid" in event
                    else {"exit": event["exit"], "ended": event["at"]})
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _submit(self, args: Sequence[str], env: Mapping[str, str]) -> tuple[str, Path, Path]:
        self._seq += 1
        ident = f"job{self._seq}"
        out, err = self.workdir / f"{ident}.out", self.workdir / f"{ident}.err"
        job = {"id": ident, "argv": list(args), "env": clean_env(env), "stdout": str(out),
               "stderr": str(err)}
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        return ident, out, err

    def _wait(self, ident: str, key: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._events.get(ident, {}):
                left = deadline - time.monotonic()
                if left <= 0 or self._proc.poll() is not None:
                    raise TimeoutError(f"{ident}: no {key} event within {timeout} s")
                self._cond.wait(min(left, 0.5))
            return dict(self._events[ident])

    def _result(self, ident: str, args: Sequence[str], out: Path, err: Path, timeout: float
                ) -> ProcResult:
        try:
            event = self._wait(ident, "exit", timeout)
        except TimeoutError:
            pid = self._events.get(ident, {}).get("pid")
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            event = self._wait(ident, "exit", 30)
        return ProcResult(list(args), event["exit"], event["ended"] - event["started"],
                          out.read_text(errors="replace"), err.read_text(errors="replace"),
                          event["started"])

    def run(self, args: Sequence[str], env: Mapping[str, str], *, timeout: float = 300
            ) -> ProcResult:
        ident, out, err = self._submit(args, env)
        return self._result(ident, args, out, err, timeout)

    def run_triggered(self, args: Sequence[str], env: Mapping[str, str],
                      action: Callable[[int], None], *, delay: float | None = None,
                      when_line: str | None = None, after_line: float = 0.0,
                      timeout: float = 120) -> tuple[ProcResult, float | None]:
        """Run a command and call ``action(pid)`` ``delay`` s after its start, or
        ``after_line`` s after a stderr line matching ``when_line`` appears (not at all if it
        finishes first). Returns the result and when the action ran (monotonic), if it did."""
        pattern = re.compile(when_line, re.M) if when_line else None
        ident, out, err = self._submit(args, env)
        started = self._wait(ident, "started", 30)
        pid, t0 = started["pid"], started["started"]
        deadline = t0 + (delay if delay is not None else timeout)
        acted: float | None = None
        while "exit" not in self._events.get(ident, {}):
            seen = pattern is not None and err.exists() and bool(
                pattern.search(err.read_text(errors="replace")))
            if seen or time.monotonic() >= deadline:
                if seen and after_line:
                    time.sleep(after_line)
                action(pid)
                acted = time.monotonic()
                break
            time.sleep(0.002)
        return self._result(ident, args, out, err, timeout), acted

    def run_killed(self, args: Sequence[str], env: Mapping[str, str], *,
                   delay: float | None = None, when_line: str | None = None,
                   after_line: float = 0.0, timeout: float = 120) -> ProcResult:
        """SIGKILL the command ``delay`` s after its start, or ``after_line`` s after a
        stderr line matching ``when_line`` appears; not killed if it finishes first."""
        def kill(pid: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        res, acted = self.run_triggered(args, env, kill, delay=delay, when_line=when_line,
                                        after_line=after_line, timeout=timeout)
        if acted is not None and res.exit_code == -signal.SIGKILL:
            res.killed, res.killed_after = True, acted - res.started
        return res

    def close(self) -> None:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ============================================================================ kill -9 trials

KILL_COMMANDS: dict[str, list[str]] = {
    "sync-odata": ["sync-odata"],
    "gen-virtual": ["gen-virtual", "--force"],
    "build-graph": ["build-graph", "--force"],
    "match-gps": ["match-gps", "--concurrency", "2"],
    "run-all": ["run-all"],
}
# What must exist before a stage has work (run once, untouched by kills).
_PREREQUISITES: dict[str, list[list[str]]] = {
    "sync-odata": [],
    "gen-virtual": [["sync-odata"]],
    "build-graph": [["sync-odata"], ["gen-virtual"]],
    "match-gps": [],
    "run-all": [],
}
_STARTED = r"\] started"  # the runner's first log line of a run, after the lock is held


@dataclass
class KillReport:
    """What :func:`kill_trials` saw: how many runs were killed mid-way, how many finished
    before the kill came, and every broken invariant (empty = all held)."""

    stage: str
    trials: int = 0
    killed: int = 0
    finished_first: int = 0
    recovered: int = 0
    problems: list[str] = field(default_factory=list)
    kill_points: list[float] = field(default_factory=list)  # seconds after "started"

    @property
    def passed(self) -> int:
        return self.trials - len({p.split(":", 1)[0] for p in self.problems})


def add_gps_work(conn: psycopg.Connection[Any], trial: int, batches: int = 20,
                 points: int = 12, prefix: str = "kill") -> int:
    """Insert ``batches`` closed batches of ``points`` points each (old timestamps, a straight
    walk through central Helsinki) for fresh devices; returns the points inserted. Each
    batch fits one OSRM request (``points`` <= [match] chunk_size)."""
    from datetime import UTC, datetime, timedelta

    rng = random.Random(trial)
    rows = []
    start = datetime(2024, 1, 1, tzinfo=UTC)
    for b in range(batches):
        lat, lon = 60.1660 + rng.random() * 0.01, 24.9380 + rng.random() * 0.012
        dlat, dlon = rng.uniform(-1, 1) * 6e-5, rng.uniform(-1, 1) * 1.2e-4
        for p in range(points):
            rows.append((f"{prefix}-{trial}-{b}", start + timedelta(seconds=3 * p),
                         lat + p * dlat, lon + p * dlon))
    with conn.cursor() as cur, cur.copy(
            "COPY gps_points (device_id, recorded_at, latitude, longitude) FROM STDIN") as cp:
        for row in rows:
            cp.write_row(row)
    return len(rows)


def _make_work(sb: Sandbox, stage: str, trial: int) -> None:
    """Give ``stage`` something new to do for this trial."""
    if stage in ("sync-odata", "run-all"):
        assert sb.odata is not None
        sb.odata.update_row("Stops", sb.odata.rows("Stops")[trial % 10]["ID"],
                            name=f"renamed in trial {trial}")
    if stage == "match-gps" or (stage == "run-all" and "PIPELINE_OSRM_URL" in sb.env):
        add_gps_work(sb.connect(), trial)


def kill_trials(sb: Sandbox, server: ForkServer, stage: str, trials: int, *, seed: int = 0,
                window: float | None = None) -> KillReport:
    """``trials`` times: give the stage work, SIGKILL it at a seeded random moment after its
    run started, then check every invariant, that ``pipeline status --json`` shows the run as
    ``crashed``, and that the next run exits 0 (and the invariants hold again).

    ``window`` is the span after the "started" line the kill moment is drawn from (default:
    1.1 x the shortest of three measured uninterrupted runs, so some kills land after the end:
    those trials count as ``finished_first``).
    """
    report = KillReport(stage)
    command = KILL_COMMANDS[stage]
    for pre in _PREREQUISITES[stage]:
        res = server.run(pre, sb.env)
        if res.exit_code != 0:
            report.problems.append(f"setup: {res.describe()}")
            return report
    if window is None:
        durations = []
        # The run's own recorded duration, "started" to result. Three runs: the first ones
        # of a fresh sandbox can be slow (cold caches), and a window set by them let half of
        # the kills of a 60 ms sync land after its end.
        for warmup in (-3, -2, -1):
            _make_work(sb, stage, warmup)
            timed = server.run([*command, "--json"], sb.env)
            if timed.exit_code != 0:
                report.problems.append(f"setup: {timed.describe()}")
                return report
            durations.append(timed.json()["duration_ms"] / 1000)
        window = max(0.05, min(durations) * 1.1)
    rng = random.Random(seed)
    for trial in range(trials):
        report.trials += 1
        tag = f"trial {trial}"
        _make_work(sb, stage, trial)
        pause = rng.uniform(0, window)
        res = server.run_killed(command, sb.env, when_line=_STARTED, after_line=pause)
        if "Traceback" in res.stderr:
            report.problems.append(f"{tag}: traceback: {res.stderr[-500:]}")
        if not res.killed and res.exit_code != 0:
            report.problems.append(f"{tag}: the unkilled run failed: {res.describe()}")
        where = f"after kill at +{pause:.3f} s" if res.killed else "after an unkilled run"
        report.problems += [f"{tag}: {where}: {p}" for p in sb.check(settled=False)]
        status = server.run(["status", "--json"], sb.env)
        try:
            last = status.json()["stages"][stage]["last_status"]
        except (json.JSONDecodeError, KeyError) as exc:
            report.problems.append(f"{tag}: status --json unreadable ({exc}): "
                                   f"{status.describe()}")
            continue
        if res.killed and last == "crashed":
            report.killed += 1
            report.kill_points.append(pause)
        elif last in ("success", "noop"):
            # Not killed, or killed after the runner had recorded the result (while it
            # printed or closed): the run had finished.
            report.finished_first += 1
            # It took less than the pause: a window measured while the machine was busier
            # (other tests beside these) would let most kills land after the end.
            window = max(0.05, min(window, pause))
        else:
            report.problems.append(f"{tag}: {where}: status shows {last}")
        nxt = server.run(command, sb.env)
        if nxt.exit_code != 0:
            report.problems.append(f"{tag}: the next run failed: {nxt.describe()}")
        else:
            report.recovered += 1
        report.problems += [f"{tag}: after the next run: {p}" for p in sb.check()]
    if stage == "match-gps" or (stage == "run-all" and "PIPELINE_OSRM_URL" in sb.env):
        report.problems += _drain(sb, server)
    return report


def _drain(sb: Sandbox, server: ForkServer) -> list[str]:
    """After the trials: once every lease a kill left behind has expired, one more run must
    finish every batch and process every point."""
    lease = float(sb.env.get("PIPELINE_MATCH_LEASE_SECONDS", "300"))
    time.sleep(lease + 0.5)
    res = server.run(["match-gps"], sb.env)
    if res.exit_code != 0:
        return [f"drain: {res.describe()}"]
    left = sb.connect().execute(
        "SELECT (SELECT count(*) FROM processing_batches WHERE status NOT IN "
        "('completed', 'too_short')) AS open, "
        "(SELECT count(*) FROM gps_point_status WHERE NOT processed) AS points").fetchone()
    assert left is not None
    problems = [f"drain: {left['open']} batch(es) still open, {left['points']} point(s) "
                "unprocessed"] if left["open"] or left["points"] else []
    return problems + [f"drain: {p}" for p in sb.check()]


# ============================================================================ outages


def _pg_ctl(services: LocalServices, url: str, *args: str) -> None:
    """Run ``pg_ctl`` on the data folder of a cluster ``services`` started (as the OS user
    that owns it: ``postgres`` when running as root)."""
    import glob as _glob

    record = next((r for r in services.registry.load() if r.kind == "postgres" and r.url == url),
                  None)
    if record is None:
        raise RuntimeError(f"{url} is not a cluster these services started")
    candidates = sorted(_glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not candidates:
        raise RuntimeError("no pg_ctl found")
    kwargs: dict[str, Any] = {}
    if os.geteuid() == 0:
        import pwd

        entry = pwd.getpwnam("postgres")
        kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    data = record.params["data"]
    # -l: the restarted postmaster must not inherit our pipes (run() would wait for it).
    subprocess.run([candidates[-1], "-D", data, "-l", f"{data}/restart.log", *args],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60, cwd="/", **kwargs)


def restart_postgres(services: LocalServices, url: str) -> None:
    """Restart a dedicated cluster (fast mode: every session is cut, like a crash/restart).
    Never use it on a shared server. Call :func:`stop_restarted_postgres` when done: the
    restarted postmaster is no longer the process ``services`` knows."""
    _pg_ctl(services, url, "restart", "-m", "fast", "-w", "-t", "30")


def stop_restarted_postgres(services: LocalServices, url: str) -> None:
    with contextlib.suppress(subprocess.CalledProcessError):
        _pg_ctl(services, url, "stop", "-m", "immediate", "-w", "-t", "30")
