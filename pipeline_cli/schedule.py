"""The schedule: which pipeline command cron runs when, so `status` can tell a late stage.

The schedule comes from a crontab file (``[schedule] crontab``, e.g. an installed copy of
``crontab.example``) whose lines that invoke ``pipeline <command>`` are recognised, and from
``[schedule] entries`` (stage = cron expression), which override the file per stage.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from .errors import ConfigError
from .settings import path_hint, quoted

# Subcommands whose runs are recorded in stage_runs and can therefore be overdue.
SCHEDULED_STAGES = ("sync-odata", "gen-virtual", "build-graph", "match-gps", "ingest-gps",
                    "run-all", "prune")
# Command groups: their subcommand is the second word (`pipeline db migrate`).
_GROUPS = {"db", "config", "graph", "batches", "restore", "demo"}
# Every top-level command: a `pipeline` token followed by another word (a /etc/cron.d user
# field named "pipeline", then `set -a && ...`) is not the call, and the search goes on.
COMMANDS = frozenset({*SCHEDULED_STAGES, *_GROUPS, "status", "doctor", "export", "completion",
                      "datasets"})
# Global options that take a value.
_VALUE_OPTIONS = {"--config", "--log-format"}
_NICKNAMES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_ASSIGN_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
# A run that started up to this long before its slot counts for it (cron fires on the minute;
# clocks and `run-all` calling a stage a few seconds early must not make it "late").
SLOT_TOLERANCE = timedelta(seconds=60)


def host_zone() -> tzinfo:
    """Cron's local time: the host's zone (TZ, else /etc/localtime), not PostgreSQL's, whose
    session TimeZone ``now`` carries. A zone with its rules, so slots past a daylight-saving
    change are not an hour off; only a TZ that names no zone file (a POSIX rule such as
    ``<+0330>-3:30``) falls back to today's offset."""
    name = os.environ.get("TZ", "/etc/localtime").lstrip(":") or "UTC"
    try:
        if name.startswith("/"):
            with open(name, "rb") as f:
                return ZoneInfo.from_file(f)
        return ZoneInfo(name)
    except (OSError, ValueError, ZoneInfoNotFoundError):
        return datetime.now().astimezone().tzinfo  # type: ignore[return-value]


@dataclass(frozen=True)
class CronEntry:
    """One recognised line: ``expr`` runs ``pipeline <command> <args>``."""

    expr: str
    command: str
    args: tuple[str, ...] = ()
    source: str = "[schedule] entries"
    line: int = 0
    tz: str | None = None

    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source

    def _zone(self) -> tzinfo:
        if self.tz:
            try:
                return ZoneInfo(self.tz)
            except (ZoneInfoNotFoundError, ValueError):
                pass
        return host_zone()

    def next(self, after: datetime) -> datetime:
        """The first slot strictly after ``after``."""
        local = after.astimezone(self._zone())
        slot: datetime = croniter(self.expr, local).get_next(datetime)
        return slot


@dataclass
class Schedule:
    """Stage name -> the cron entries that run it."""

    entries: dict[str, list[CronEntry]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    # Crontab lines that call pipeline but name no command: status shows them as a warning.
    warnings: list[str] = field(default_factory=list)

    def for_stage(self, stage: str) -> list[CronEntry]:
        return self.entries.get(stage, [])

    def next_run(self, stage: str, now: datetime) -> datetime | None:
        found = [e.next(now) for e in self.for_stage(stage)]
        return min(found) if found else None

    def expected_since(self, stage: str, last_ok: datetime | None, baseline: datetime,
                       now: datetime) -> datetime | None:
        """The first slot a good run should have filled but none did, or None if on time.

        ``last_ok`` is when the last good run started; ``baseline`` (e.g. when the schema was
        installed) stands in for it when the stage never ran. A slot counts as filled by a run
        that started up to :data:`SLOT_TOLERANCE` before it.
        """
        entries = self.for_stage(stage)
        if not entries:
            return None
        base = last_ok + SLOT_TOLERANCE if last_ok is not None else baseline
        first = min(e.next(base) for e in entries)
        return first if first <= now else None

    def to_json(self) -> dict[str, list[dict[str, str]]]:
        return {stage: [{"cron": e.expr, "command": " ".join(("pipeline", e.command, *e.args)),
                         "from": e.where()} for e in entries]
                for stage, entries in self.entries.items()}


def _expand(text: str, env: Mapping[str, str]) -> str:
    return _VAR_RE.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def _cron_command(raw: str) -> str:
    """The command part as cron runs it: an unescaped ``%`` ends it (the rest is stdin)."""
    out = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw) and raw[i + 1] == "%":
            out.append("%")
            i += 2
            continue
        if ch == "%":
            break
        out.append(ch)
        i += 1
    return "".join(out)


def _tokens(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _calls(tokens: list[str]) -> list[int]:
    """Where ``pipeline`` (or ``python -m pipeline_cli``) appears: each may start a call."""
    return [i for i, tok in enumerate(tokens) if os.path.basename(tok) == "pipeline"
            or (tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "pipeline_cli")]


def find_invocation(command: str) -> tuple[str, tuple[str, ...]] | None:
    """(subcommand, args) of the first ``pipeline`` call in a shell command line, or None."""
    tokens = _tokens(command)
    for i in _calls(tokens):
        is_module = tokens[i] == "-m"
        rest = tokens[i + (2 if is_module else 1):]
        j = 0
        while j < len(rest) and rest[j].startswith("-"):
            j += 2 if rest[j] in _VALUE_OPTIONS else 1
        words: list[str] = []
        for tok2 in rest[j:]:
            if not tok2 or tok2[0] in "&|;<>()":
                break
            words.append(tok2)
        if not words or words[0] not in COMMANDS:
            continue  # e.g. a /etc/cron.d user field named "pipeline" before the real call
        if words[0] in _GROUPS and len(words) > 1:
            return f"{words[0]} {words[1]}", tuple(words[2:])
        return words[0], tuple(words[1:])
    return None


def _cron_problem(expr: str) -> str | None:
    """Why ``expr`` cannot schedule a stage: not cron, or no slot ever (``0 0 31 2 *``)."""
    if not croniter.is_valid(expr):
        return "invalid cron expression"
    if len(expr.split()) != 5 and expr not in _NICKNAMES:  # croniter reads a 6th as seconds
        return "not 5 time fields in the cron expression"
    try:
        croniter(expr, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        return "a cron expression that never fires"
    return None


_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12),
           ("day-of-week", 0, 6))


def _step_problem(expr: str) -> str | None:
    """A step larger than its field's range (``*/1000`` minutes, ``*/31`` days): croniter
    reads it as the range's first value alone (``0``, once an hour), not what the entry
    meant."""
    if expr.startswith("@"):
        return None
    for (name, low, high), text in zip(_FIELDS, expr.split(), strict=False):
        for part in text.split(","):
            step = part.partition("/")[2]
            if step.isdigit() and int(step) > high - low:
                return (f"step {int(step)} too large for the {name} field ({low}-{high}) "
                        "in the cron expression")
    return None


def parse_crontab(text: str, source: str = "crontab",
                  warnings: list[str] | None = None) -> list[CronEntry]:
    """Every line of ``text`` that runs ``pipeline``; ConfigError names a bad line.

    A line that calls pipeline but names no command it knows is added to ``warnings``.
    """
    env: dict[str, str] = {}
    tz: str | None = None
    found: list[CronEntry] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assign = _ASSIGN_RE.match(line)
        if assign and not line.startswith("@"):
            value = assign.group(2).strip().strip("'\"")
            env[assign.group(1)] = _expand(value, env)
            if assign.group(1) in ("CRON_TZ", "TZ"):
                tz = value
            continue
        fields = line.split(None, 1 if line.startswith("@") else 5)
        if line.startswith("@reboot"):
            continue
        if line.startswith("@"):
            if fields[0] not in _NICKNAMES or len(fields) < 2:
                raise ConfigError(f"{source}:{lineno}: unknown cron schedule {fields[0]!r}",
                                  key="schedule.crontab")
            expr, command = fields[0], fields[1]
        else:
            if len(fields) < 6:
                raise ConfigError(f"{source}:{lineno}: expected 5 time fields and a command",
                                  key="schedule.crontab")
            expr, command = " ".join(fields[:5]), fields[5]
        if (why := _cron_problem(expr)) is not None:
            raise ConfigError(f"{source}:{lineno}: {why} {expr!r}", key="schedule.crontab")
        expanded = _expand(_cron_command(command), env)
        try:
            call = find_invocation(expanded)
        except ValueError as exc:
            raise ConfigError(f"{source}:{lineno}: cannot parse the command: {exc}",
                              key="schedule.crontab") from None
        tokens = _tokens(expanded)
        # A bare leading "pipeline" is a /etc/cron.d user field: that user may run other jobs.
        if call is None and warnings is not None and [
                i for i in _calls(tokens) if i or tokens[0] != "pipeline"]:
            warnings.append(f"{source}:{lineno} calls pipeline but names no pipeline command: "
                            "status cannot tell when it is overdue")
        if call is not None:
            found.append(CronEntry(expr=expr, command=call[0], args=call[1], source=source,
                                   line=lineno, tz=tz))
    return found


def check_entries(entries: Mapping[str, str]) -> None:
    """ConfigError naming the first ``[schedule] entries`` entry that is no stage or no cron
    expression that fires (the settings loader calls this: status failed on it, config show
    did not)."""
    for stage, expr in entries.items():
        if stage not in SCHEDULED_STAGES:
            raise ConfigError(f"[schedule] entries: unknown stage {quoted(stage)} "
                              f"(expected one of {', '.join(SCHEDULED_STAGES)})",
                              key="schedule.entries")
        if (why := _cron_problem(expr) or _step_problem(expr)) is not None:
            raise ConfigError(f"[schedule] entries: {why} {quoted(expr)} for {stage}",
                              key="schedule.entries")


def build_schedule(crontab: str | os.PathLike[str] | None,
                   entries: Mapping[str, str] | None = None) -> Schedule:
    """The schedule from an optional crontab file plus per-stage overrides."""
    schedule = Schedule()
    if crontab:
        path = Path(crontab)
        try:
            # A comment in Latin-1 is no reason to refuse the schedule.
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            hint = path_hint(crontab) if isinstance(exc, FileNotFoundError) else ""
            raise ConfigError(f"cannot read [schedule] crontab {path}: {exc.strerror}{hint}",
                              key="schedule.crontab") from None
        schedule.sources.append(str(path))
        for entry in parse_crontab(text, str(path), schedule.warnings):
            if entry.command in SCHEDULED_STAGES:
                schedule.entries.setdefault(entry.command, []).append(entry)
    check_entries(entries or {})
    for stage, expr in (entries or {}).items():
        schedule.entries[stage] = [CronEntry(expr=expr, command=stage)]
    if entries:
        schedule.sources.append("[schedule] entries")
    return schedule

