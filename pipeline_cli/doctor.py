"""``pipeline doctor``: a pre-flight check of the settings and every outside system.

Each check talks to one system through its adapter, reads only (the S3 probe object and probe
bucket are removed at once) and turns the project's own errors into a failed :class:`Check`,
so one broken system never hides the state of the others. Nothing is recorded in run history.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from . import db
from .errors import ConfigError, PipelineError, RedisError, SourceError
from .settings import Settings, redact

# What each check needs; "every setting named below is set" in the settings check.
REQUIRED = (("database", "url"), ("redis", "url"), ("s3", "endpoint"), ("osrm", "url"),
            ("odata", "url"))
ORDER = ("settings", "database", "redis", "s3", "osrm", "odata")
# doctor must answer in seconds even when a system hangs: short timeouts, no retries.
TIMEOUT = 5.0

LonLat = tuple[float, float]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    ms: int
    endpoint: str = ""  # where the system is, secrets masked (for the table, not the JSON)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "ms": self.ms}


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def settings_ok(self) -> bool:
        return all(c.ok for c in self.checks if c.name == "settings")

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}


class _Failed(PipelineError):
    """A check's own verdict (not an outside error): the system answered, but wrongly."""


def settings_failure(exc: ConfigError) -> DoctorReport:
    """The report when the settings cannot even be loaded (the command exits 78)."""
    return DoctorReport([Check("settings", False, str(exc), 0)])


def run_doctor(settings: Settings, *, point: LonLat | None = None) -> DoctorReport:
    """Run every check in :data:`ORDER`; ``point`` (lon, lat) is where OSRM is asked
    ``/nearest`` (default: the centroid of the stops, else 0,0)."""
    checks: dict[str, Callable[[], str]] = {
        "settings": lambda: _settings(settings),
        "database": lambda: _database(settings),
        "redis": lambda: _redis(settings),
        "s3": lambda: _s3(settings),
        "osrm": lambda: _osrm(settings, point),
        "odata": lambda: _odata(settings),
    }
    report = DoctorReport()
    for name in ORDER:
        started = time.monotonic()
        endpoint = _endpoint(settings, name)
        try:
            detail, ok = checks[name](), True
        except PipelineError as exc:
            detail, ok = str(exc), False
        ms = int((time.monotonic() - started) * 1000)
        # The endpoint holds no user, password or query; redacted as a whole secret value,
        # a Redis URL without a password was shown as "***". Its passwords are masked all
        # the same, in case a '#' or '/' in one moved where the URL's parts split.
        report.checks.append(Check(name, ok, settings.redact(detail), ms,
                                   redact(endpoint, [p for p in settings.secrets()
                                                     if "://" not in p and "=" not in p])))
    return report


def _endpoint(s: Settings, name: str) -> str:
    """Where the system is, without user or password (the URLs themselves may be secrets)."""
    if name == "settings":
        return s.config_file or "(environment)"
    if name == "s3":
        return f"{s.s3.endpoint or '(unset)'} bucket {s.s3.bucket}"
    url = {"database": s.database.url, "redis": s.redis.url, "osrm": s.osrm.url,
           "odata": s.odata.url}[name]
    if not url:
        return "(unset)"
    if name == "database":  # libpq's reading: a '#' or '?' in a URL's password is the password
        where = db.server(url)  # and the parts it left to PGHOST, PGSERVICE and the like
        if where.malformed:
            return "(unparsable conninfo)"
        if where.service:
            return f"service {where.service}"
        # a socket directory is the host, written percent-encoded as libpq reads it; each
        # host of several with its port, as libpq pairs them (h1:5432,h2:5433)
        hosts = ",".join(f"{quote(host, safe='') if host.startswith('/') else host}"
                         f"{f':{port}' if port else ''}" for host, port in where.addresses)
        return f"postgresql://{hosts}/{where.dbname}"
    scheme, _, rest = url.partition("://")
    # the user and password end at the last '@' ('#', '?' or '/' can be in a password)
    rest = rest.rsplit("@", 1)[-1]
    try:
        parts = urlsplit(f"{scheme}://{rest}")
        shown = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query="",
                                          fragment=""))
        # urlunsplit drops the '//' of an empty host: unix:///run/redis.sock
        return shown.replace(":", "://", 1) if not parts.netloc else shown
    except ValueError:
        return "(unparsable URL)"


# ---------------------------------------------------------------------------- the checks
# Each returns its detail line on success and raises a PipelineError on failure.


def _settings(s: Settings) -> str:
    from .adapters.odata_format import resolve_mapping
    from .schedule import build_schedule

    missing = [f"[{sec}] {key}" for sec, key in REQUIRED if getattr(getattr(s, sec), key)
               in (None, "")]
    resolve_mapping(s.odata.mapping)  # ConfigError names a bad key
    build_schedule(s.schedule.crontab, s.schedule.entries)  # as status reads it: else 78 there
    if missing:
        raise ConfigError(f"missing setting{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}")
    return f"loaded from {s.config_file or 'the environment'}; every required setting is set"


def _database_of(s: Settings, url: str) -> db.Database:
    return db.Database(url, connect_timeout=int(min(s.database.connect_timeout, TIMEOUT)),
                       pooler=s.database.pooler)


def _transaction_pooled(database: db.Database) -> bool:
    """Whether two open client connections ever share one server session: true through a
    transaction (or statement) pooler, never on a direct or session-pooled connection. The
    pooler hands its idle server session to the next transaction, so a few tries suffice."""
    first = database.connect("pipeline doctor", autocommit=True)
    second = database.connect("pipeline doctor", autocommit=True)
    try:
        with db.wrap_errors("probing for a transaction pooler"):
            for _ in range(5):
                a = first.execute("SELECT pg_backend_pid() AS pid").fetchone()
                b = second.execute("SELECT pg_backend_pid() AS pid").fetchone()
                if a and b and a["pid"] == b["pid"]:
                    return True
    finally:
        first.close()
        second.close()
    return False


def _database(s: Settings) -> str:
    url = str(s.require("database", "url"))
    conn = _database_of(s, url).connect("pipeline doctor", autocommit=True)
    try:
        with db.wrap_errors("reading the server version"):
            row = conn.execute("SELECT current_setting('server_version') AS server_version, "
                               "current_setting('transaction_read_only') = 'on' AS read_only"
                               ).fetchone()
        version = row["server_version"] if row else "?"
        if row and row["read_only"]:  # a replica passed, and every stage then failed
            raise _Failed(f"PostgreSQL {version}: {db.READ_ONLY}")
        db.check_encoding(conn)  # else 'not migrated', and migrate cannot
        schema = db.check_schema(conn)  # SchemaError for a pending (or unknown) migration
        with db.wrap_errors("checking table privileges"):
            denied = [r["name"] for r in conn.execute(db.query("doctor", "unwritable_tables"))]
    finally:
        conn.close()
    if denied:
        raise _Failed(f"PostgreSQL {version}, schema {schema}: the role cannot insert, update "
                      f"and delete in (or, for virtual tables, truncate) {', '.join(denied[:5])}"
                      + (f" and {len(denied) - 5} more" if len(denied) > 5 else ""))
    pooled = _transaction_pooled(_database_of(s, url))
    if pooled and not s.database.pooler == db.POOLER_TRANSACTION:
        raise _Failed("PostgreSQL is reached through a transaction pooler but [database] pooler "
                      "is none: set [database] pooler = \"transaction\" "
                      "(PIPELINE_DATABASE_POOLER)")
    pooler = ("through a transaction pooler" if pooled else
              "pooler = transaction (no pooler seen; also correct without one)"
              if s.database.pooler == db.POOLER_TRANSACTION else "direct")
    return (f"PostgreSQL {version}; schema {schema} is current; the role can write every "
            f"table; {pooler}")


def _redis(s: Settings) -> str:
    import redis

    from .adapters.graph_store import eviction_risk, wrap_errors

    try:  # a plain client even for a cluster: INFO answers on the node of the URL
        client = redis.Redis.from_url(str(s.require("redis", "url")),
                                      socket_timeout=min(s.redis.socket_timeout, TIMEOUT),
                                      socket_connect_timeout=min(s.redis.socket_timeout, TIMEOUT))
    except ValueError as exc:  # e.g. a port that is not a number
        raise RedisError(f"the Redis URL is unusable: {exc}") from None
    try:
        with wrap_errors(client, "reading INFO"):
            try:  # one round trip: server, memory, replication and cluster sections
                info: dict[str, Any] | None = client.info()
            except redis.exceptions.NoPermissionError:  # an ACL user without @dangerous,
                info = None  # as managed Redis services give: build-graph needs no INFO
            enabled = info is not None and str(info.get("cluster_enabled", 0)) == "1"
            state = str(client.cluster("info").get("cluster_state")) if enabled else ""
    finally:
        client.close()
    if info is None:
        return ("INFO refused to this user: version, cluster mode, replication and eviction "
                f"policy not checked; {_prefix_owner(s)}")
    version = info.get("redis_version", "?")
    if info.get("role") == "slave":  # reads pass; every write is refused (READONLY)
        raise _Failed(f"Redis {version} is a replica of {info.get('master_host', '?')}:"
                      f"{info.get('master_port', '?')}: build-graph cannot write to it; point "
                      "[redis] url at the primary")
    if enabled and not s.redis.cluster:
        raise _Failed(f"Redis {version} is a Redis Cluster node but [redis] cluster is false: "
                      "set [redis] cluster = true (PIPELINE_REDIS_CLUSTER)")
    if s.redis.cluster and not enabled:
        raise _Failed(f"[redis] cluster is true but Redis {version} is not a cluster node: "
                      "set [redis] cluster = false")
    if enabled and state != "ok":
        raise _Failed(f"Redis Cluster state is {state or '?'}: some slots are not served")
    risk = eviction_risk(info)
    if risk:
        raise _Failed(f"Redis {version} {risk}")
    return (f"Redis {version}; cluster: {'yes, state ok' if enabled else 'no'}; "
            f"{_prefix_owner(s)}")


def _prefix_owner(s: Settings) -> str:
    """Whose ``[redis] prefix`` is: this database's, nobody's yet, or (PrefixOwned, the check
    fails) another database's, whose build-graph runs would otherwise delete each other's
    graphs. Reads only: claiming is build-graph's."""
    from .adapters.graph_store import GraphReader, connect

    identity = None
    if s.database.url:
        try:
            conn = _database_of(s, s.database.url).connect("pipeline doctor", autocommit=True)
            try:
                identity = db.deployment_id(conn)
            finally:
                conn.close()
        except PipelineError:  # the database check says why
            pass
    client = connect(str(s.require("redis", "url")), cluster=s.redis.cluster,
                     socket_timeout=min(s.redis.socket_timeout, TIMEOUT),
                     connect_timeout=min(s.redis.socket_timeout, TIMEOUT))
    try:
        reader = GraphReader(client, s.redis.prefix)
        owner = reader.owner() if identity is None else reader.check_owner(identity)
    finally:
        client.close()
    prefix = f"prefix {s.redis.prefix!r}"
    if identity is None:
        return (f"{prefix}: owner {owner or 'none'}, not compared (no database identity: "
                "see the database check)")
    if owner is None:
        return (f"{prefix} is unclaimed: the first build-graph that writes a graph claims it "
                "for this database")
    return f"{prefix} belongs to this database"


def _s3(s: Settings) -> str:
    from .adapters.backups import BackupStore

    store = BackupStore.connect(str(s.require("s3", "endpoint")), s.s3.access_key,
                                s.s3.secret_key, s.s3.bucket, secure=s.s3.secure,
                                region=s.s3.region, timeout=TIMEOUT, retries=0,
                                prefix=s.s3.prefix)
    token = uuid.uuid4().hex[:12]
    if not store.bucket_exists():
        # S3 has no "may I create a bucket" call: create a uniquely named one and remove it.
        store.may_create_buckets(f"pipeline-doctor-{token}")
        return (f"bucket {s.s3.bucket} does not exist yet; the credentials may create "
                "buckets, so the first run will create it")
    key, data = f"doctor/probe-{token}", f"pipeline doctor {token}".encode()
    store.put_bytes(key, data, "text/plain")
    try:
        if store.get_bytes(key) != data:
            raise _Failed(f"S3 bucket {s.s3.bucket}: the probe object read back differently")
    finally:
        store.delete(key)
    return (f"bucket {s.s3.bucket}{f', prefix {store.prefix!r}' if store.prefix else ''}: "
            f"probe object written, read and deleted; {_next_export(s, store)}")


def _next_export(s: Settings, store: Any) -> str:
    """Whether build-graph may write its next export: ExportOwned (the check fails) when the
    bucket and key prefix hold another database's export at this database's next graph
    version (two installations on one bucket), as build-graph would stop there. Reads only."""
    from .stages.build_graph import check_export_free, export_prefix

    identity, row = None, None
    if s.database.url:
        try:
            conn = _database_of(s, s.database.url).connect("pipeline doctor", autocommit=True)
            try:
                identity = db.deployment_id(conn)
                with db.wrap_errors("reading the graph version sequence"):
                    row = conn.execute(db.query("build_graph", "peek_seq")).fetchone()
            finally:
                conn.close()
        except PipelineError:  # the database check says why
            pass
    if identity is None or row is None:
        return "graph exports not compared (no database identity: see the database check)"
    version = f"graph-v{row['seq']}"
    check_export_free(store, version, identity)
    return f"the next graph export, {export_prefix(version)}, is free"


def _osrm(s: Settings, point: LonLat | None) -> str:
    from .adapters.osrm import OsrmClient

    where = "--point"
    if point is None:
        point, where = _stops_centroid(s)
    client = OsrmClient(str(s.require("osrm", "url")), profile=s.osrm.profile,
                        timeout=min(s.osrm.timeout, TIMEOUT), retries=1, pool_size=1)
    try:
        waypoint = client.nearest((point[1], point[0]))
    finally:
        client.close()
    return (f"/nearest ({s.osrm.profile}) for {point[0]:.5f},{point[1]:.5f} ({where}): a road "
            f"{float(waypoint.get('distance', 0.0)):.0f} m away")


def _stops_centroid(s: Settings) -> tuple[LonLat, str]:
    """The centroid of the real stops when the database answers and has some, else 0,0
    (OSRM's /nearest snaps from anywhere, so the check still proves server and profile)."""
    if not s.database.url:
        return (0.0, 0.0), "default 0,0"
    try:
        conn = _database_of(s, s.database.url).connect("pipeline doctor", autocommit=True)
        try:
            with db.wrap_errors("reading the stops' centroid"):
                row = conn.execute(db.query("doctor", "stops_centroid")).fetchone()
        finally:
            conn.close()
    except PipelineError:
        return (0.0, 0.0), "default 0,0"
    if not row or row["lon"] is None:
        return (0.0, 0.0), "default 0,0"
    return (float(row["lon"]), float(row["lat"])), "centroid of the stops"


def _odata(s: Settings) -> str:
    from .adapters.odata import ODataClient
    from .adapters.odata_format import resolve_mapping

    # One attempt with short timeouts: doctor reports, cron's sync-odata retries.
    quick = dataclasses.replace(s.odata, retries=1,
                                connect_timeout=min(s.odata.connect_timeout, TIMEOUT),
                                read_timeout=min(s.odata.read_timeout, TIMEOUT))
    with ODataClient(quick) as client:
        via = f"via {client.via}" if client.via else "no proxy"
        sets = []
        try:
            protocol = client.protocol  # the service root, with the configured credentials
            for mapping in resolve_mapping(s.odata.mapping).values():
                client.probe(mapping.entity_set, orderby=mapping.key_field, select=mapping.select,
                             filter=mapping.filter, fields=mapping.sources)  # the sync's first page
                sets.append(mapping.entity_set)
        except SourceError as exc:  # which proxy the failing request went through
            if client.via and client.via not in str(exc):
                raise SourceError(f"{exc} ({via})") from None
            raise
    return f"OData {protocol} service answers ({via}); $top=1 ok for {', '.join(sets)}"
