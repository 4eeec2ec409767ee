"""Settings: one frozen object built once from an optional TOML file plus environment variables.

A key ``k`` in TOML section ``[s]`` is overridden by the environment variable ``PIPELINE_S_K``.
Every setting has one name, one default and one line of documentation (the field's ``doc``);
``pipeline config show`` lists them with their source, secrets masked.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import errno
import json
import math
import os
import re
import stat
import threading
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import ConfigError
from .modes import DEFAULT_SPEEDS_KMH, duplicate_names

ENV_PREFIX = "PIPELINE_"
POOLERS = ("none", "transaction")
MAX_CONCURRENCY = 256  # OSRM requests in flight per match-gps process ([match] concurrency)
CONFIG_ENV = "PIPELINE_CONFIG"


def setting(default: Any, doc: str, *, secret: bool = False, env: bool = True,
            empty: bool = False) -> Any:
    """Declare a setting: its default, its one-line documentation, whether it is a secret.

    ``env=False`` marks nested tables (e.g. field mappings) that only a TOML file can give.
    ``empty=True``: an empty environment variable is the value "" (it means unset otherwise).
    """
    metadata = {"doc": doc, "secret": secret, "env": env, "empty": empty}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DatabaseSettings:
    url: str | None = setting(None, "libpq URL of the PostgreSQL database", secret=True)
    connect_timeout: int = setting(10, "seconds to wait for a database connection")
    pooler: str = setting(
        "none", "what sits between the pipeline and PostgreSQL: 'none', or 'transaction' for "
        "PgBouncer-style transaction pooling (no prepared statements, no session state)"
    )


@dataclass(frozen=True)
class RedisSettings:
    url: str | None = setting(None, "Redis URL, e.g. redis://127.0.0.1:6379/0", secret=True)
    prefix: str = setting("pipeline", "every Redis key starts with this prefix; one prefix "
                          "per database (build-graph claims it)")
    socket_timeout: float = setting(10.0, "seconds before a Redis call times out")
    cluster: bool = setting(False, "[redis] url names a node of a Redis Cluster (cluster client)")


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = setting(None, "S3/MinIO endpoint as host:port, or http:// or "
                                   "https:// then host:port (the scheme sets secure)")
    access_key: str | None = setting(None, "S3 access key")
    secret_key: str | None = setting(None, "S3 secret key", secret=True)
    bucket: str = setting("pipeline", "bucket holding dataset backups and graph exports")
    secure: bool = setting(False, "use HTTPS for S3")
    region: str = setting("us-east-1", "S3 region name")
    prefix: str = setting(
        "", "key prefix of every object written to the bucket, e.g. 'staging' (\"\" = none); "
        "installations sharing a bucket each need one of their own", empty=True
    )


@dataclass(frozen=True)
class ODataSettings:
    url: str | None = setting(None, "OData service root URL")
    username: str | None = setting(None, "basic-auth user name")
    password: str | None = setting(None, "basic-auth password", secret=True)
    token: str | None = setting(None, "bearer token", secret=True)
    token_url: str | None = setting(None, "OAuth 2.0 token endpoint: bearer tokens by the "
                                    "client-credentials grant, renewed before they expire")
    client_id: str | None = setting(None, "OAuth client id (with token_url)")
    client_secret: str | None = setting(None, "OAuth client secret (with token_url)",
                                        secret=True)
    scope: str | None = setting(None, "OAuth scope asked for (with token_url), e.g. "
                                "https://org.crm.dynamics.com/.default")
    version: str = setting("auto", "OData protocol version: auto, v4 or v2")
    connect_timeout: float = setting(10.0, "seconds to connect to the OData server")
    read_timeout: float = setting(60.0, "seconds to wait for an OData response")
    max_pages: int = setting(10000, "cap on pages per entity set (stops never-ending nextLinks)")
    max_response_bytes: int = setting(64 * 1024 * 1024, "cap on the size of one response body")
    retries: int = setting(5, "attempts for connection errors, 5xx, 408 and 429")
    backoff_base: float = setting(0.5, "first wait between retries, seconds (doubles, jittered)")
    backoff_max: float = setting(60.0, "longest wait between retries, seconds")
    page_size: int = setting(0, "odata.maxpagesize preference sent to the server; 0 = none. "
                             "With paging = 'client' also the $top of each request (0: 1000)")
    paging: str = setting("server", "'server' follows the server's nextLinks; 'client' pages "
                          "with $top/$skip, for a service that sends a whole set at once")
    count: bool = setting(True, "ask for $count / $inlinecount: sizes the progress bars, "
                          "and a set read with fewer rows than counted fails the sync")
    foreign_next_link: str = setting(
        "rewrite", "a nextLink to another host: 'rewrite' follows its path and query on the "
        "host of [odata] url, 'refuse' fails the sync; a redirect to another host too: "
        "'rewrite' follows it, 'refuse' fails"
    )
    orderby: bool = setting(True, "ask for $orderby=<key field>, a stable paging order; false "
                            "for a service that refuses $orderby")
    select: bool = setting(True, "ask for $select=<mapped fields>; false for a service that "
                           "refuses $select (the whole entities are read)")
    proxy: str | None = setting(
        None, "HTTP proxy URL for the OData server, over HTTPS_PROXY/HTTP_PROXY/ALL_PROXY/"
        "NO_PROXY of the environment (used when unset); \"\" = no proxy", empty=True
    )
    ca_file: str | None = setting(
        None, "PEM file of the certificate authorities to trust for the OData server (a "
        "private CA); unset: the public CAs bundled with certifi"
    )
    mapping: dict[str, Any] = setting(
        {}, "entity-set and field mapping ([odata.mapping.stops] etc.; a field but the key "
        "may be a path into complex values: Location/City/Name)", env=False
    )


@dataclass(frozen=True)
class OsrmSettings:
    url: str | None = setting(None, "osrm-routed base URL, e.g. http://127.0.0.1:5000")
    profile: str = setting("driving", "OSRM profile in request URLs")
    timeout: float = setting(30.0, "seconds to wait for an OSRM response")
    retries: int = setting(4, "attempts for connection errors and 5xx")
    retry_wait_max: float = setting(5.0, "longest wait between OSRM retries, seconds")


@dataclass(frozen=True)
class MatchSettings:
    gap_seconds: int = setting(300, "a time gap above this starts a new GPS batch")
    max_batch_seconds: int = setting(3600, "longest time span of one GPS batch")
    lease_seconds: int = setting(300, "how long a claimed batch stays leased to a worker")
    max_attempts: int = setting(5, "failed attempts before a batch becomes dead")
    radius_m: float = setting(
        5.0, "GPS accuracy (std. deviation) sent as OSRM /match radiuses, metres"
    )
    chunk_size: int = setting(100, "points per OSRM /match request (server max-matching-size)")
    chunk_overlap: int = setting(10, "points shared by consecutive chunks")
    too_short_after_seconds: int = setting(
        3600, "a one-point batch older than this closes as too_short"
    )
    concurrency: int = setting(4, "OSRM requests in flight per process (1 to 256)")
    backoff_base_seconds: float = setting(30.0, "first retry delay of a failed batch")
    backoff_max_seconds: float = setting(3600.0, "longest retry delay of a failed batch")


@dataclass(frozen=True)
class VirtualSettings:
    main_spacing_km: float = setting(50.0, "MAIN_GRID spacing over the region of real stops")
    grid_reach_km: float = setting(
        200.0, "MAIN_GRID only this far around real stops, km (200: 4 cells of hinterland "
        "beyond the outermost stops, yet no grid over the sea between two regions); at least "
        "main_spacing_km"
    )
    city_spacing_km: float = setting(10.0, "CITY_GRID spacing around major cities")
    airport_spacing_km: float = setting(5.0, "AIRPORT_GRID spacing around airports")
    city_radius_km: float = setting(30.0, "radius of the CITY_GRID around a city")
    airport_radius_km: float = setting(15.0, "radius of the AIRPORT_GRID around an airport")
    city_min_stops: int = setting(10, "real stops a city needs to count as major")
    threshold_fraction: float = setting(
        0.2, "drop a grid point closer than this fraction of its spacing to a real/denser point"
    )
    k: int = setting(4, "nearest neighbours each virtual stop connects to")
    max_route_km: float = setting(
        75.0, "longest virtual route (at least 1.414 x main_spacing_km, a grid cell's diagonal)")
    speeds_kmh: dict[str, float] = setting(
        DEFAULT_SPEEDS_KMH,
        "speed per route mode, km/h (0.1 to 10000), merged over these defaults; names are "
        "case-insensitive and take the aliases in docs/build-graph.md (virtual routes use "
        "'virtual')",
    )
    service_start: str = setting("05:00", "virtual flights' service window start, HH:MM")
    service_end: str = setting("23:00", "virtual flights' service window end, HH:MM")
    headway_s: int = setting(1800, "virtual flights' headway, seconds")
    walk_max_km: float = setting(
        2.0, "virtual routes up to this long use mode 'walk' and get no flights; 0 = never"
    )
    max_virtual_stops: int = setting(
        5_000_000, "refuse to generate more grid points than this (guards a too-fine spacing)"
    )


@dataclass(frozen=True)
class GraphSettings:
    retention: int = setting(3, "graph versions kept in Redis")
    fatal_warnings: bool = setting(
        False, "treat disconnected components / unreachable stops as fatal"
    )
    chunk_size: int = setting(5000, "keys per Redis pipeline flush")


@dataclass(frozen=True)
class RetentionSettings:
    gps_days: int = setting(
        30, "days processed GPS points (and their finished batches) are kept; 0 = forever")
    polyline_days: int = setting(
        0, "days a cached polyline is kept after it was created or last read; 0 = forever")
    runs_days: int = setting(90, "days of run history kept; 0 = forever")
    datasets: int = setting(
        10, "dataset versions kept (with their S3 backups); 0 = all")
    chunk_size: int = setting(10000, "rows prune deletes per transaction")


@dataclass(frozen=True)
class NotifySettings:
    ping_url: str | None = setting(
        None, "healthchecks-style URL: pinged on success, <url>/fail on failure", secret=True
    )
    timeout: float = setting(5.0, "seconds for a heartbeat ping (a failed ping never fails a run)")


@dataclass(frozen=True)
class HealthSettings:
    backlog_warning: int = setting(1000, "unprocessed GPS points that make status warn")
    backlog_critical: int = setting(5000, "unprocessed GPS points that make status critical")
    backlog_age_warning_s: int = setting(3600, "age of the oldest unprocessed GPS point that warns")
    backlog_age_critical_s: int = setting(
        21600, "age of the oldest unprocessed GPS point that is critical"
    )
    failed_batches_warning: int = setting(50, "GPS batches waiting for a retry that warn")
    failed_batches_critical: int = setting(200, "GPS batches waiting for a retry that are critical")
    dead_batches_warning: int = setting(1, "dead GPS batches that make status warn")
    dead_batches_critical: int = setting(200, "dead GPS batches that make status critical")
    failures_warning: int = setting(1, "consecutive failed runs of a stage that warn")
    failures_critical: int = setting(3, "consecutive failed runs of a stage that are critical")
    sync_age_warning_h: float = setting(24.0, "hours since the last good sync-odata run that warn")
    sync_age_critical_h: float = setting(
        72.0, "hours since the last good sync-odata run that are critical"
    )
    overdue_grace_s: int = setting(600, "seconds past the expected run before a stage is overdue")
    overdue_critical_s: int = setting(21600, "seconds overdue after which a stage is critical")
    running_warning_s: int = setting(21600, "a run still running after this long warns (stuck?)")


@dataclass(frozen=True)
class RunnerSettings:
    timeout_sync_odata: float = setting(7200.0, "hard limit of a sync-odata run, seconds")
    timeout_gen_virtual: float = setting(3600.0, "hard limit of a gen-virtual run, seconds")
    timeout_build_graph: float = setting(3600.0, "hard limit of a build-graph run, seconds")
    timeout_ingest_gps: float = setting(3600.0, "hard limit of an ingest-gps run, seconds")
    timeout_match_gps: float = setting(
        3600.0, "hard limit of a match-gps run, seconds (above its --max-runtime)"
    )
    timeout_run_all: float = setting(
        14400.0, "hard limit of a run-all run (the whole chain), seconds"
    )
    timeout_prune: float = setting(3600.0, "hard limit of a prune run, seconds")

    def limits(self) -> dict[str, float]:
        """Stage name -> hard limit in seconds."""
        return {f.name.removeprefix("timeout_").replace("_", "-"): float(getattr(self, f.name))
                for f in dataclasses.fields(self)}

    def check_budget(self, option: str, seconds: float | None, *stages: str) -> None:
        """A soft budget (``option``, e.g. --max-runtime) must end before the hard limits."""
        for stage in stages:
            limit = self.limits()[stage]
            if seconds is not None and seconds >= limit:
                key = f"timeout_{stage.replace('-', '_')}"
                raise ConfigError(
                    f"{option} {seconds:g} must be below [runner] {key} ({limit:g} s): the "
                    "soft budget has to end the run before the hard limit stops it",
                    key=f"runner.{key}")


@dataclass(frozen=True)
class ScheduleSettings:
    crontab: str | None = setting(None, "crontab file whose pipeline entries define the schedule")
    entries: dict[str, str] = setting({}, "stage = cron expression, overrides the crontab")


@dataclass(frozen=True)
class Settings:
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    odata: ODataSettings = field(default_factory=ODataSettings)
    osrm: OsrmSettings = field(default_factory=OsrmSettings)
    match: MatchSettings = field(default_factory=MatchSettings)
    virtual: VirtualSettings = field(default_factory=VirtualSettings)
    graph: GraphSettings = field(default_factory=GraphSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    config_file: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)

    def require(self, section: str, key: str) -> Any:
        """The value of ``[section] key``, or a ConfigError naming it when unset."""
        value = getattr(getattr(self, section), key)
        if value in (None, ""):
            raise ConfigError(
                f"missing setting [{section}] {key} "
                f"(set {env_name(section, key)} or [{section}] {key} in the config file)",
                key=f"{section}.{key}",
            )
        return value

    def secrets(self) -> list[str]:
        """Every secret value (and the password inside any URL or conninfo) for redaction."""
        found: list[str] = []
        for _section, _key, value, secret in _iter_values(self):
            if value in (None, "") or not isinstance(value, str):
                continue
            if secret:
                found.append(value)
            found += [(m.group("pw") or m.group("pw2") or m.group("pw3") or "").strip("'")
                      for m in _PASSWORDS.finditer(value)]
            found += libpq_passwords(value)
        # A server that echoes the Authorization header puts this in its error body; the
        # user and password are the adapter's: the settings', else the URL's own.
        try:
            parts = urlsplit(self.odata.url or "")
            user = self.odata.username or unquote(parts.username or "")
            password = self.odata.password or unquote(parts.password or "")
        except ValueError:
            user = password = ""
        if user and password:
            found.append(base64.b64encode(f"{user}:{password}".encode()).decode())
        if self.odata.client_id and self.odata.client_secret:  # the token endpoint's basic auth
            found.append(base64.b64encode(
                f"{self.odata.client_id}:{self.odata.client_secret}".encode()).decode())
        with _RUNTIME_LOCK:
            found += _RUNTIME_SECRETS
        return sorted({s for s in found if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        return redact(text, self.secrets())

    def describe(self, *, typed: bool = False) -> list[tuple[str, Any, str, str]]:
        """(key, shown value, source, doc) for every setting; secrets masked. ``typed``: the
        value as JSON has it (a number, a boolean, null when unset, an object), for --json."""
        rows = []
        for section, key, value, secret in _iter_values(self):
            name = f"{section}.{key}"
            shown = (value if typed and (value is None or not secret and isinstance(
                value, (bool, int, float, dict, list))) else display_value(value, secret))
            rows.append((name, shown, self.sources.get(name, "default"), _doc(section, key)))
        return rows


# Secrets no setting holds, known only once the process has them: the access tokens fetched
# from [odata] token_url. Settings.secrets() lists them with its own, so the one redaction
# (output, logs, run history) masks a token a service echoes in a page or an error body.
_RUNTIME_SECRETS: list[str] = []
_RUNTIME_LOCK = threading.Lock()  # the OData read-ahead thread fetches tokens too


def add_runtime_secret(value: str) -> None:
    """Mask ``value`` wherever the settings' secrets are masked, for the rest of the process."""
    with _RUNTIME_LOCK:
        if value not in _RUNTIME_SECRETS:
            _RUNTIME_SECRETS.append(value)


# An error message quotes at most this much of a value given by the operator: a 10 kB value
# (a pasted file, a runaway variable) made a 10 kB "one line" error.
SHOWN_MAX = 60


def shorten(text: str, limit: int = SHOWN_MAX) -> str:
    """``text``, or its first ``limit`` characters and how long it is: ``abc…(10000
    characters)``."""
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} characters)"


def quoted(value: Any) -> str:
    """``repr(value)`` for an error message, a long string cut by :func:`shorten`."""
    if isinstance(value, str) and len(value) > SHOWN_MAX:
        return f"{value[:SHOWN_MAX]!r}…({len(value)} characters)"
    return repr(value)


_QUOTED = re.compile(rf"'([^'\n]{{{SHOWN_MAX + 1},}})'|\(([^()\n]{{{SHOWN_MAX + 1},}})\)")


def shorten_values(message: str) -> str:
    """A message from elsewhere (Click's "Invalid value for '--x': '...'") with each quoted
    or parenthesized value longer than SHOWN_MAX cut by :func:`shorten`."""
    def cut(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return f"'{m.group(1)[:SHOWN_MAX]}'…({len(m.group(1))} characters)"
        return f"({shorten(m.group(2))})"

    return _QUOTED.sub(cut, message)


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def is_conninfo(text: str) -> bool:
    """True for a libpq key=value connection string naming a server or database."""
    if "=" not in text or "://" in text:
        return False
    try:  # libpq's own parser: quoting rules, and it rejects unknown keywords
        params = conninfo_to_dict(text)
    except psycopg.Error:
        return False
    return bool(params.keys() & {"host", "hostaddr", "dbname", "service"})


def _mask_userinfo(url: str) -> str:
    """A URL setting with its password as ``***``, where the clients read it: up to the last
    '@' of the host part, a space included (mask_passwords, for free text, stops at one)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}").geturl()


def display_value(value: Any, secret: bool) -> str:
    if value is None:
        return "(unset)"
    if secret and isinstance(value, str) and libpq_passwords(value):
        return mask_libpq(value)  # host and dbname stay visible: which database it is
    if isinstance(value, str) and "://" in value:
        masked = mask_passwords(_mask_userinfo(value))
        if secret and masked == value and not value.startswith(("postgres", "redis")):
            return "***"  # a URL that is itself the secret (e.g. a heartbeat token URL)
        return masked
    if secret and isinstance(value, str) and is_conninfo(value):
        return mask_passwords(value)  # host and dbname stay visible: which database it is
    if secret:
        return "***"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


# Where a password sits is known from the text's structure: the userinfo of any URL
# (postgresql://, redis://, http://: ``scheme://user:PASSWORD@``) and libpq's ``password=``
# (conninfo strings and URL query parameters). Only the password part is replaced.
_PASSWORDS = re.compile(
    r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/?#@]*:(?P<pw>[^\s/?#]*)@"
    r"|\b(?:ssl)?password\s*=\s*(?P<pw2>'(?:[^'\\]|\\.)*'|[^\s'&;,)]+)"
    # a credential in a URL's query (?token=..., &api_key=...; Azure's ?code= and
    # &subscription-key=)
    r"|[?&](?:access_token|api_?key|auth|code|key|secret|sig|signature|subscription-key|token)"
    r"=(?P<pw3>[^\s&#]+)",
    re.IGNORECASE,
)

# A secret value shorter than this is never searched for in free text: with a password "o",
# "sync-odata" became "sync-***data", and the mask itself told where the password was. Such a
# secret is masked only where its place is known (above) and settings are shown by name. The
# same length is the floor of the test suite's leak scanner (testing.reliability.find_secrets).
MIN_SEARCHED_SECRET = 6


def mask_passwords(text: str) -> str:
    """``text`` with every URL userinfo password, libpq ``password=`` value and credential in
    a URL's query (``?token=``, ``&api_key=``) as ``***``."""
    def mask(m: re.Match[str]) -> str:
        group = next(g for g in ("pw", "pw2", "pw3") if m.group(g) is not None)
        start, end = m.start(group) - m.start(), m.end(group) - m.start()
        return m.group(0)[:start] + "***" + m.group(0)[end:]

    return _PASSWORDS.sub(mask, text)


def redact(text: str, secrets: list[str]) -> str:
    """Mask passwords where the text's structure places them, and each secret value of at
    least MIN_SEARCHED_SECRET characters where it stands as a whole value (a token, a URL
    component), never inside a longer word. Nothing else in ``text`` changes."""
    searched = [s for s in sorted(secrets, key=len, reverse=True) if len(s) >= MIN_SEARCHED_SECRET]

    def sub(text: str, values: list[str]) -> str:
        for secret in values:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
            if len(secret) > SHOWN_MAX:  # quoted cut short (quoted, shorten): not its length
                text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret[:SHOWN_MAX])}(['\)]?)…"
                              r"\(\d+ characters\)", r"***\1", text)
        return text

    # A plain secret (a password) first and whole: mask_passwords stops a password at a ','
    # or '#' libpq reads as part of it, and the rest stayed shown. A URL or conninfo secret
    # last, so that its host stays readable once its password is masked.
    text = sub(text, [s for s in searched if "://" not in s and "=" not in s])
    return sub(mask_passwords(text), [s for s in searched if "://" in s or "=" in s])


def libpq_passwords(text: str) -> list[str]:
    """The passwords (every key ending in "password") of a libpq URL or conninfo string, as
    libpq reads them; [] for any other text."""
    if not (text.startswith(("postgres://", "postgresql://")) or is_conninfo(text)):
        return []
    try:
        params = conninfo_to_dict(text)
    except psycopg.Error:
        return []
    return [str(v) for k, v in params.items() if k.endswith("password") and v]


def mask_libpq(text: str) -> str:
    """A libpq URL or conninfo string with its passwords as ``***``, split where libpq splits:
    a URL's password runs to the first '@' or '/', a conninfo value to unescaped whitespace."""
    passwords = libpq_passwords(text)
    text = re.sub(r"^(postgres(?:ql)?://[^@/:]*:)[^@/]*(?=@)", r"\1***", text)
    text = re.sub(r"([?&][a-z]*password=)[^&]*", r"\1***", text)
    if "://" not in text:
        text = re.sub(r"(\b[a-z]*password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:\\.|[^\s\\])+)",
                      r"\1***", text)
    for password in passwords:  # what the patterns missed (a short one: not searched for)
        if len(password) >= MIN_SEARCHED_SECRET:
            text = text.replace(password, "***")
    return text


def secret_env_names() -> list[str]:
    """The environment variables of every secret setting (for redaction without settings)."""
    return [env_name(section, f.name) for section, cls in _section_types().items()
            for f in dataclasses.fields(cls) if f.metadata.get("secret")]


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Settings)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(Settings)
        if dataclasses.is_dataclass(hints[f.name])
    }


def _doc(section: str, key: str) -> str:
    cls = _section_types()[section]
    for f in dataclasses.fields(cls):
        if f.name == key:
            return str(f.metadata.get("doc", ""))
    return ""


def _iter_values(settings: Settings) -> typing.Iterator[tuple[str, str, Any, bool]]:
    for section in _section_types():
        obj = getattr(settings, section)
        for f in dataclasses.fields(obj):
            yield section, f.name, getattr(obj, f.name), bool(f.metadata.get("secret"))


def _coerce(raw: Any, annotation: Any, name: str, from_env: bool) -> Any:
    """Turn a TOML or environment value into the field's type, or raise ConfigError naming it."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw is None or (from_env and raw == ""):
            return None
        return _coerce(raw, inner[0], name, from_env)
    try:
        if annotation is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {quoted(raw)}")
        if annotation is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(f"expected an integer, got {quoted(raw)}")
            try:
                return int(raw)
            except ValueError:  # Python's message quotes the whole value
                raise ValueError(f"expected an integer, got {quoted(raw)}") from None
        if annotation is float:
            if isinstance(raw, bool):
                raise ValueError(f"expected a number, got {quoted(raw)}")
            try:
                value = float(raw)
            except ValueError:  # Python's message quotes the whole value
                raise ValueError(f"expected a number, got {quoted(raw)}") from None
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"expected a finite number, got {quoted(raw)}")
            return value
        if annotation is str:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError(f"expected a string, got {type(raw).__name__}")
            return str(raw)
        if origin is dict:
            if from_env:
                raw = json.loads(raw)
            if not isinstance(raw, dict):
                raise ValueError("expected a table")
            value_type = args[1] if len(args) == 2 else Any
            if value_type is Any:
                return raw
            return {str(k): _coerce(v, value_type, f"{name}.{k}", False) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"malformed setting {name}: {exc}", key=name) from None
    raise ConfigError(f"setting {name} has an unsupported type", key=name)


def _did_you_mean(word: str, known: Iterable[str], shape: str) -> str:
    """`` (did you mean [redis] prefix?)`` for a misspelt key, section or variable."""
    close = difflib.get_close_matches(word, sorted(known), n=1)
    return f" (did you mean {shape.format(close[0])}?)" if close else ""


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the Settings from the TOML file (if any) and the environment."""
    environ = os.environ if environ is None else environ
    path = config_file or environ.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    shown = printable_path(path) if path else ""
    if path:
        try:
            # utf-8-sig: a BOM (Windows editors) is no statement
            data = tomllib.loads(_read_config(path).decode("utf-8-sig"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {shown}{path_hint(path)}",
                              key="config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"malformed config file {shown}: {exc}", key="config") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"malformed config file {shown}: not UTF-8 {_where(exc)}",
                              key="config") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {shown}: {exc.strerror}",
                              key="config") from None
    sections = _section_types()
    unknown = sorted(set(data) - set(sections))
    for name in unknown:
        if not isinstance(data[name], dict):
            raise ConfigError(f"setting {shorten(name)} in {shown} is outside any section (put it "
                              "below its [section] line)", key=name)
    if unknown:
        raise ConfigError(f"unknown config section [{shorten(unknown[0])}] in {shown}"
                          + _did_you_mean(unknown[0], sections, "[{}]"), key=unknown[0])
    built: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for section, cls in sections.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"malformed setting [{section}]: expected a table", key=section)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(table) - names)
        if extra:
            raise ConfigError(f"unknown setting [{section}] {shorten(extra[0])} in {shown}"
                              + _did_you_mean(extra[0], names, f"[{section}] {{}}"),
                              key=f"{section}.{extra[0]}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f"{section}.{f.name}"
            env = env_name(section, f.name)
            if f.metadata.get("env", True) and env in environ:
                raw = os_text(environ[env])
                if not is_utf8(raw):
                    raise ConfigError(f"malformed setting {env}: not valid UTF-8 (an env file "
                                      "in Latin-1?)", key=env)
                values[f.name] = "" if f.metadata.get("empty") and not raw else _coerce(
                    raw, hints[f.name], env, True)
                sources[name] = f"env {env}"
            elif f.name in table:
                values[f.name] = _coerce(table[f.name], hints[f.name], f"[{section}] {f.name}",
                                         False)
                sources[name] = f"file {shown}"
            if name in sources:
                _check_text(values[f.name], hints[f.name],
                            env if sources[name].startswith("env") else f"[{section}] {f.name}",
                            may_be_empty=bool(f.metadata.get("empty")))
        built[section] = cls(**values)
        # A typo in a variable's name was ignored in silence (the file's typos are errors).
        prefix = env_name(section, "")
        known = {env_name(section, f.name) for f in dataclasses.fields(cls)
                 if f.metadata.get("env", True)}
        for var in sorted(v for v in environ if v.startswith(prefix) and v not in known):
            if var.removeprefix(prefix).lower() in names:
                raise ConfigError(f"{var}: [{section}] {var.removeprefix(prefix).lower()} can "
                                  "be set only in the config file", key=var)
            raise ConfigError(f"unknown setting {var} in the environment"
                              + _did_you_mean(var, known, "{}"), key=var)
    _misspelt_variables(environ, sections)
    built["s3"] = _s3_scheme(built["s3"], sources)
    settings = Settings(**built, config_file=shown or None, sources=sources)
    _validate(settings)
    return settings


def _where(exc: UnicodeDecodeError) -> str:
    """Where a config file stops being UTF-8, as an editor counts: line and column, the
    byte, and the likely encoding (a byte offset alone had the operator counting)."""
    data, start = bytes(exc.object), exc.start
    line = data.count(b"\n", 0, start) + 1
    column = start - data.rfind(b"\n", 0, start)
    saved = "UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "Latin-1"
    return f"at line {line}, column {column} (byte 0x{data[start]:02x}; saved in {saved}?)"


def _misspelt_variables(environ: Mapping[str, str], sections: dict[str, type]) -> None:
    """A ``PIPELINE_*`` variable outside every section that is one or two letters from a
    setting's (PIPELINE_DATABSE_URL, PIPELINE_database_url) is an error, as a typo inside a
    section is: the job ran on the defaults in silence. Others are left alone: other tools
    use the prefix too (Azure Pipelines' PIPELINE_WORKSPACE)."""
    known = sorted(env_name(section, f.name) for section, cls in sections.items()
                   for f in dataclasses.fields(cls) if f.metadata.get("env", True))
    prefixes = tuple(env_name(section, "") for section in sections)
    for var in sorted(environ):
        if not var.startswith("PIPELINE_") or var in known or var.startswith(prefixes):
            continue
        close = [name for name in known if _edits(var.upper(), name) <= 2]
        if close:
            raise ConfigError(f"unknown setting {var} in the environment (did you mean "
                              f"{close[0]}?)", key=var)


def _edits(a: str, b: str) -> int:
    """Levenshtein distance with transpositions (optimal string alignment)."""
    if abs(len(a) - len(b)) > 2:
        return 3
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1,
                          d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _s3_scheme(s3: S3Settings, sources: dict[str, str]) -> S3Settings:
    """An endpoint as boto3, aws-cli and mc take it (operators paste it): the minio client
    takes host:port, and the scheme says [s3] secure, unless secure was set to the opposite."""
    scheme, sep, rest = (s3.endpoint or "").partition("://")
    if not sep:
        return s3
    secure = {"http": False, "https": True}.get(scheme.lower())
    if secure is None or not rest.strip("/"):
        raise ConfigError("malformed setting [s3] endpoint: expected host:port, "
                          "http://host:port or https://host:port", key="s3.endpoint")
    endpoint = "PIPELINE_S3_ENDPOINT" if sources["s3.endpoint"].startswith("env") \
        else "[s3] endpoint"
    if "s3.secure" in sources and s3.secure != secure:
        flag = "PIPELINE_S3_SECURE" if sources["s3.secure"].startswith("env") else "[s3] secure"
        raise ConfigError(f"conflicting settings: {endpoint} starts with {scheme.lower()}:// "
                          f"but {flag} is {str(s3.secure).lower()} (drop one)", key="s3.secure")
    sources.setdefault("s3.secure",
                       f"{sources['s3.endpoint']} (the {scheme.lower()}:// of [s3] endpoint)")
    return dataclasses.replace(s3, endpoint=rest, secure=secure)


_UNREADABLE = ((stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISBLK, "a block device"))


def _read_config(path: str | os.PathLike[str]) -> bytes:
    """The config file's bytes: a file, a pipe (``--config <(sops -d pipeline.toml)``) or
    ``/dev/null`` (no file: the environment only). Opened without blocking, so that a named
    pipe nobody writes to fails at once instead of hanging the job at open; checked on the
    descriptor (no race with a stat first): a terminal (``/dev/stdin`` typed at) and a
    directory are refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    kind = "a terminal" if os.isatty(fd) else next(
        (name for test, name in _UNREADABLE if test(mode)), None)
    if kind:
        os.close(fd)
        raise OSError(errno.EINVAL, f"not a file to read ({kind})")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    if not data and stat.S_ISFIFO(mode):  # its writer gave nothing, or there is none
        raise OSError(errno.ENODATA, "a pipe that gave nothing (does anything write to it?)")
    return data


def path_hint(path: str | os.PathLike[str]) -> str:
    """Why a file that an operator sees may not be found by a job: a ``~`` nobody expanded,
    or a relative path (cron and systemd start jobs in another directory); else ""."""
    text = os.fsdecode(path)
    if text.startswith("~"):
        return (" (a ~ is expanded by a shell, not by a crontab or a systemd EnvironmentFile: "
                "give the full path)")
    if not os.path.isabs(text):
        try:
            where = printable_path(os.getcwd())
        except OSError:  # removed under the process (a deploy swapped the release directory)
            where = ", which was removed"
        else:
            where = " " + where
        return f" (relative to the working directory{where}: give the full path)"
    return ""


def printable_path(path: str | os.PathLike[str]) -> str:
    """A file name as text: bytes that are not UTF-8 (a legitimate Latin-1 file name) escaped
    as \\xe9, so that it can go into a message, JSON or the database."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def os_text(text: str) -> str:
    """An argument or environment value read as UTF-8: Python decoded its bytes with the
    locale's encoding, so under LC_ALL=C with PYTHONUTF8=0 (ASCII) a UTF-8 "Jyväskylä" came
    as escapes and was refused as not UTF-8 (a Latin-1 locale made it mojibake). Bytes that
    are not UTF-8 keep the locale's reading: a Latin-1 locale's "é", or escapes that
    :func:`is_utf8` refuses."""
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:
        return text


def is_utf8(text: str) -> bool:
    """False for a value (an environment variable, an argument) holding bytes that are not
    UTF-8: Python keeps them as lone surrogates, which no encoder takes later (a traceback)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_CONTROL_HINTS = {"\r": " (an env file with CRLF line ends?)"}


def _check_text(value: Any, annotation: Any, name: str, *, may_be_empty: bool = False) -> None:
    """A string setting holds no control character (a CRLF env file left a '\\r' in a Redis
    prefix, and the graph went to keys nobody reads) and, without a None default, is not
    empty (an empty bucket or OSRM profile failed only later, deep in a run)."""
    if not isinstance(value, str):
        return
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(f"malformed setting {name}: holds the control character "
                          f"{bad!r}{_CONTROL_HINTS.get(bad, '')}", key=name)
    if annotation is str and not value and not may_be_empty:
        raise ConfigError(f"malformed setting {name}: must not be empty", key=name)


def _without_values(message: str) -> str:
    """A URL parser's message without the fragment it quotes: that fragment can be part of
    the password (an unencoded '/', '#' or '%' in it moved the split)."""
    text = re.sub(r"""\s*(?:as\s+)?(["'])(?:(?!\1).)*\1""", "", message).strip().rstrip(":")
    return text + (" (write a '/', '#', '?', '@' or '%' in a password percent-encoded, e.g. "
                   "%2F for '/')")


def _host_port(url: str, section: str, key: str, bad: Any) -> Any:
    """``urlsplit(url)``, or the ConfigError ``bad`` makes for a port that is no number or
    out of range, a broken IPv6 address or no host."""
    try:
        parts = urlsplit(url)
        # Only after the '@': a password may hold a space. An env file's stray one was "port
        # could not be cast" (with a password hint), or, before an S3 endpoint, no error
        # until every S3 call failed as "unreachable".
        if any(c.isspace() for c in parts.netloc.rpartition("@")[2]):
            raise bad(section, key, "a space or tab in the host or port (a stray one in the "
                      "env file?)")
        if url != url.strip():  # after a path: sent, and a 404 quoting it
            raise bad(section, key, "a space or tab at its end (a stray one in the env "
                      "file?)")
        parts.port  # noqa: B018  (raises for a port that is no number or out of range)
    except ValueError as exc:
        raise bad(section, key, _without_values(str(exc).lower())) from None
    if not parts.hostname:
        raise bad(section, key, "no host name")
    return parts


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_conninfo(url: str, bad: Any) -> None:
    """What libpq would refuse only when connecting, named now: a malformed URL (its message
    holds no password: libpq names the part it could not read), a port or an sslmode."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise bad("database", "url", _without_values(str(exc).splitlines()[0])) from None
    if "@" in str(params.get("host") or ""):  # the rest of a password, so not shown
        raise bad("database", "url", "a host name cannot hold '@' (write an @ in the user "
                  "name or password as %40)")
    for port in filter(None, str(params.get("port") or "").split(",")):
        if not (port.isdigit() and 0 < int(port) < 65536):
            raise bad("database", "url", _without_values("port must be 1 to 65535"))
    if params.get("sslmode") not in (None, *_SSLMODES):
        raise bad("database", "url", f"sslmode must be one of {', '.join(_SSLMODES)}")


def _duration_cap(key: str) -> tuple[int, str] | None:
    """The largest value a duration setting may have, by its unit (its name says it)."""
    if key.endswith("_days"):
        return 36_500, "100 years"
    if key.endswith("_h"):
        return 87_600, "10 years"
    # The retry waits too: a larger one overflowed time.sleep ("internal error: OverflowError")
    if key.endswith(("_s", "_seconds", "timeout", "wait_max")) or key.startswith(
            ("timeout_", "backoff_")):
        return 315_360_000, "10 years in seconds"
    return None


# Every count reaches PostgreSQL somewhere (a LIMIT, a comparison): a larger one failed every
# run with "bigint out of range", as a database error that named no setting.
BIGINT_MAX = 2**63 - 1


def _validate(s: Settings) -> None:
    def bad(section: str, key: str, why: str) -> ConfigError:
        return ConfigError(f"malformed setting [{section}] {key}: {why}", key=f"{section}.{key}")

    if s.database.connect_timeout <= 0 or s.redis.socket_timeout <= 0:
        raise bad(*(("database", "connect_timeout") if s.database.connect_timeout <= 0
                    else ("redis", "socket_timeout")), "must be positive")
    if s.database.url and not (
        s.database.url.startswith(("postgres://", "postgresql://")) or "=" in s.database.url
    ):
        raise bad("database", "url", "expected postgresql://... or a libpq conninfo string")
    if s.database.url:
        _check_conninfo(s.database.url, bad)
    if s.database.pooler not in POOLERS:
        raise bad("database", "pooler", f"expected {' or '.join(POOLERS)}")
    if s.redis.url and not s.redis.url.startswith(("redis://", "rediss://", "unix://")):
        raise bad("redis", "url", "expected redis://, rediss:// or unix://")
    if s.redis.url and not s.redis.url.startswith("unix://"):
        parts = _host_port(s.redis.url, "redis", "url", bad)
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise bad("redis", "url", _without_values("the database must be a number"))
    if not s.redis.prefix or any(c in s.redis.prefix for c in " \t\n*?[]"):
        raise bad("redis", "prefix", "must be non-empty without spaces or glob characters")
    if s.s3.endpoint and "/" in s.s3.endpoint.rstrip("/"):  # a trailing '/' is harmless
        raise bad("s3", "endpoint", "expected host:port without a path (S3 serves buckets "
                  "from the endpoint's root)")
    if s.s3.endpoint and "@" in s.s3.endpoint:  # a pasted URL's credentials: not shown
        raise bad("s3", "endpoint", "expected host:port without a user or password (set "
                  "[s3] access_key and secret_key)")
    if s.s3.endpoint:
        _host_port("//" + s.s3.endpoint.rstrip("/"), "s3", "endpoint", bad)
    if s.s3.prefix and not re.fullmatch(r"/*[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*/*",
                                        s.s3.prefix) or any(
            p in (".", "..") for p in s.s3.prefix.split("/")):
        raise bad("s3", "prefix", "expected segments of letters, digits and - _ . ! * ' ( ) "
                  "separated by '/', e.g. 'staging' or 'pipeline/city-a'")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", s.s3.bucket or "a.b"):
        raise bad("s3", "bucket", "an S3 bucket name is 3-63 lowercase letters, digits, dots "
                  "and hyphens, starting and ending with a letter or digit")
    if any(pair in s.s3.bucket for pair in ("..", ".-", "-.")):  # the minio client's rules
        raise bad("s3", "bucket", "no two dots in a row, nor a dot next to a hyphen, in an S3 "
                  "bucket name")
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", s.s3.bucket):
        raise bad("s3", "bucket", "must not look like an IP address (S3 bucket naming rules)")
    for section, key in (("odata", "url"), ("odata", "proxy"), ("odata", "token_url"),
                         ("osrm", "url"), ("notify", "ping_url")):
        value = getattr(getattr(s, section), key)
        if not value:
            continue
        if not value.lower().startswith(("http://", "https://")):  # HTTP:// too
            raise bad(section, key, "expected an http:// or https:// URL")
        _host_port(value, section, key, bad)
    if s.odata.version not in ("auto", "v4", "v2"):
        raise bad("odata", "version", "expected auto, v4 or v2")
    if option := next((k for k, _ in parse_qsl(urlsplit(s.odata.url or "").query)
                       if k.startswith("$") and k != "$format"), None):  # SAP's sap-client: yes
        raise bad("odata", "url", f"its query holds the system query option {option!r}, which "
                  "would go with every request; a filter goes in [odata.mapping.<table>] "
                  "filter, and paging is the sync's")
    if unquote(urlsplit(s.odata.url or "").path).rstrip("/").endswith("/$metadata"):
        raise bad("odata", "url", "ends with $metadata, the service's schema: give the service "
                  "root, without it")
    if s.odata.foreign_next_link not in ("rewrite", "refuse"):
        raise bad("odata", "foreign_next_link", "expected rewrite or refuse")
    if s.odata.token and not (s.odata.token.isascii() and s.odata.token.isprintable()):
        # an HTTP header holds only these; a pasted newline or zero-width space is invisible
        raise bad("odata", "token", "must be printable ASCII (a stray newline, space or "
                  "non-ASCII character in it?)")
    if s.odata.token_url:
        if s.odata.token:
            raise bad("odata", "token", "set either a static token or token_url (the client-"
                      "credentials grant), not both")
        for key in ("client_id", "client_secret"):
            if not getattr(s.odata, key):
                raise ConfigError(f"missing setting [odata] {key}: [odata] token_url needs it "
                                  f"(set {env_name('odata', key)} or [odata] {key} in the "
                                  "config file)", key=f"odata.{key}")
        if ":" in str(s.odata.client_id):
            raise bad("odata", "client_id", "must not contain ':' (HTTP basic auth)")
    for key in ("connect_timeout", "read_timeout", "max_pages", "max_response_bytes",
                "retries"):
        if getattr(s.odata, key) <= 0:
            raise bad("odata", key, "must be positive")
    if s.odata.page_size < 0:
        raise bad("odata", "page_size", "must be 0 (the server's page size) or more")
    if s.odata.paging not in ("server", "client"):
        raise bad("odata", "paging", "expected server or client")
    if s.odata.paging == "client" and not s.odata.orderby:
        raise bad("odata", "paging", "'client' needs [odata] orderby = true: $skip needs a "
                  "stable order")
    if s.odata.backoff_base < 0 or s.odata.backoff_max < s.odata.backoff_base:
        raise bad("odata", "backoff_base" if s.odata.backoff_base < 0 else "backoff_max",
                  "need 0 <= backoff_base <= backoff_max")
    if s.odata.mapping:
        from .adapters.odata_format import resolve_mapping  # lazy: configs with a mapping pay

        resolve_mapping(s.odata.mapping)
    if s.schedule.entries:  # status and doctor read them; every command refuses them now
        from .schedule import check_entries  # lazy: croniter for configs with entries only

        check_entries(s.schedule.entries)
    for key in ("gap_seconds", "max_batch_seconds", "lease_seconds", "max_attempts",
                "chunk_size", "concurrency"):
        if getattr(s.match, key) <= 0:
            raise bad("match", key, "must be positive")
    if s.match.concurrency > MAX_CONCURRENCY:  # urllib3 fills a pool of that many slots first
        raise bad("match", "concurrency", f"must be at most {MAX_CONCURRENCY} (as --concurrency)")
    if not 0 <= s.match.chunk_overlap < s.match.chunk_size // 2 + 1:
        raise bad("match", "chunk_overlap", "must be >= 0 and at most half of chunk_size")
    if s.match.chunk_size < 3:
        raise bad("match", "chunk_size", "must be at least 3 (OSRM's smallest matching size)")
    if not s.match.radius_m > 0:
        raise bad("match", "radius_m", "must be positive")
    if s.match.too_short_after_seconds < 0:
        raise bad("match", "too_short_after_seconds", "must be >= 0")
    if not 0 <= s.match.backoff_base_seconds <= s.match.backoff_max_seconds:
        raise bad("match", "backoff_max_seconds",
                  "need 0 <= backoff_base_seconds <= backoff_max_seconds")
    if s.osrm.retries < 1 or s.osrm.timeout <= 0:
        raise bad("osrm", "retries" if s.osrm.retries < 1 else "timeout", "must be positive")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.osrm.profile):
        raise bad("osrm", "profile", "expected a profile name such as driving (letters, digits, "
                  "'_', '-', '.'): it is a part of every request's URL path")
    for key in ("main_spacing_km", "grid_reach_km", "city_spacing_km", "airport_spacing_km",
                "k", "max_route_km", "headway_s", "city_min_stops", "max_virtual_stops"):
        if getattr(s.virtual, key) <= 0:
            raise bad("virtual", key, "must be positive")
    for key in ("city_radius_km", "airport_radius_km", "walk_max_km"):
        if getattr(s.virtual, key) < 0:
            raise bad("virtual", key, "must not be negative")
    for key in ("main_spacing_km", "grid_reach_km", "city_spacing_km", "airport_spacing_km",
                "max_route_km", "city_radius_km", "airport_radius_km", "walk_max_km"):
        if getattr(s.virtual, key) > 20_015:
            raise bad("virtual", key, "must be at most half the Earth's circumference (20015)")
    # A main grid point's farthest neighbour (diagonal) is about sqrt(2) spacings away: with
    # shorter routes the main grid points get no routes to each other, and the graph falls
    # apart into islands.
    if s.virtual.max_route_km < math.sqrt(2) * s.virtual.main_spacing_km:
        raise bad("virtual", "max_route_km",
                  f"must be at least {math.sqrt(2) * s.virtual.main_spacing_km:.1f} km (1.414 x "
                  f"main_spacing_km = {s.virtual.main_spacing_km:g}), or main grid points get no "
                  f"routes to each other; got {s.virtual.max_route_km:g}: raise it or lower "
                  "main_spacing_km")
    # Every stop lies within about 0.75 spacings of a main grid point: a shorter reach leaves
    # stops with no main grid point, and a network without cities or airports with none.
    if s.virtual.grid_reach_km < s.virtual.main_spacing_km:
        raise bad("virtual", "grid_reach_km",
                  f"must be at least main_spacing_km ({s.virtual.main_spacing_km:g}), or a stop "
                  f"may have no main grid point within reach; got {s.virtual.grid_reach_km:g}: "
                  "raise it or lower main_spacing_km")
    if s.virtual.headway_s > 86400:
        raise bad("virtual", "headway_s", "must be at most a day (86400)")
    if not 0 <= s.virtual.threshold_fraction < 1:
        raise bad("virtual", "threshold_fraction", "must be >= 0 and < 1")
    for mode, speed in s.virtual.speeds_kmh.items():
        if not 0.1 <= speed <= 10_000:  # 1e-310 km/h gave routes an infinite weight
            raise bad("virtual", "speeds_kmh",
                      f"the speed of mode {quoted(mode)} must be 0.1 to 10000 km/h, got {speed:g}")
    twice = duplicate_names(s.virtual.speeds_kmh)
    if twice:
        raise bad("virtual", "speeds_kmh",
                  f"{quoted(twice[0])} and {quoted(twice[1])} name the same mode")
    window = []
    for key in ("service_start", "service_end"):
        value = getattr(s.virtual, key)
        hh, _, mm = value.partition(":")
        if not (hh.isdigit() and mm.isdigit() and len(mm) == 2 and int(hh) < 24
                and int(mm) < 60):
            raise bad("virtual", key, f"expected HH:MM, got {quoted(value)}")
        window.append(int(hh) * 60 + int(mm))
    if window[0] >= window[1]:
        raise bad("virtual", "service_end", "must be after service_start")
    if s.graph.retention < 2:
        raise bad("graph", "retention",
                  "must be at least 2 (the previous version stays for readers that resolved it)")
    if s.graph.chunk_size <= 0:
        raise bad("graph", "chunk_size", "must be positive")
    for low, high in (("backlog_warning", "backlog_critical"),
                      ("backlog_age_warning_s", "backlog_age_critical_s"),
                      ("failed_batches_warning", "failed_batches_critical"),
                      ("dead_batches_warning", "dead_batches_critical"),
                      ("failures_warning", "failures_critical"),
                      ("sync_age_warning_h", "sync_age_critical_h")):
        if getattr(s.health, low) <= 0:
            raise bad("health", low, "must be positive")
        if getattr(s.health, high) < getattr(s.health, low):
            raise bad("health", high, f"must be at least [health] {low}")
    for key in ("gps_days", "polyline_days", "runs_days", "datasets"):
        if getattr(s.retention, key) < 0:
            raise bad("retention", key, "must not be negative (0 keeps forever)")
    if s.retention.chunk_size <= 0:
        raise bad("retention", "chunk_size", "must be positive")
    if s.notify.timeout <= 0:
        raise bad("notify", "timeout", "must be positive")
    for f in dataclasses.fields(s.runner):
        if not getattr(s.runner, f.name) > 0:
            raise bad("runner", f.name, "must be positive")
    for part in dataclasses.fields(s):  # durations beyond these overflow date arithmetic
        values = getattr(s, part.name)
        for f in dataclasses.fields(values) if dataclasses.is_dataclass(values) else ():
            value, cap = getattr(values, f.name), _duration_cap(f.name)
            # No number here means anything below 0 (a wait, a grace, a count): a negative
            # [osrm] retry_wait_max passed and crashed matching with "sleep length must be
            # non-negative".
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise bad(part.name, f.name, "must not be negative")
            if cap is not None and isinstance(value, int | float) and abs(value) > cap[0]:
                raise bad(part.name, f.name, f"must be at most {cap[0]:,} ({cap[1]})")
            if isinstance(value, int) and not isinstance(value, bool) and value > BIGINT_MAX:
                raise bad(part.name, f.name, f"must be at most {BIGINT_MAX:,} (PostgreSQL's "
                          "bigint)")


def markdown_reference() -> str:
    """The settings table of docs/configuration.md (regenerate with `make docs`)."""
    lines = []
    for section, cls in _section_types().items():
        lines += [f"\n## [{section}]\n", "| key | environment variable | default | meaning |",
                  "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default: Any = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                            else f.default)
            env = env_name(section, f.name) if f.metadata.get("env", True) else "(file only)"
            secret = " (secret)" if f.metadata.get("secret") else ""
            shown = display_value(default, False) if default != "" else '""'
            lines.append(f"| `{f.name}` | `{env}` | `{shown}` | "
                         f"{f.metadata.get('doc', '')}{secret} |")
    return "\n".join(lines) + "\n"
