"""Fuzzing the command line and the settings: every option and argument of every command (the
Click tree walked, values chosen by the parameter's type), then every setting given wrong
values in a TOML file and in ``PIPELINE_*`` variables, and broken config files.

Every case must end with a documented exit code (docs/operations.md), never a traceback, one
error line naming the option, value or setting, and nothing written when it is rejected. The
commands run in-process (CliRunner) against a real migrated sandbox; stages run with
``--dry-run`` where they have it, and the others find nothing to do in the empty database.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from pipeline_cli.cli import cli as root
from pipeline_cli.errors import ConfigError
from pipeline_cli.settings import _section_types, env_name, load_settings
from tests.support.clirunner import Cli
from tests.support.reliability import Sandbox

SandboxFactory = Callable[..., Sandbox]
DOCUMENTED = {0, 1, 2, 75, 78, 124, 130}  # docs/operations.md, "Exit codes"
# One line, `pipeline X: error: ...` (`pipeline: error: ...` before a command), Click's usage
# errors included.
ERROR_LINE = re.compile(r"^pipeline(?: [a-z -]+)?: error: \S.*$", re.M)
# Tables that hold what a run writes (stage_runs: a recorded run).
WRITTEN = ("datasets", "stops", "virtual_generations", "graph_versions", "gps_points",
           "processing_batches", "stage_runs")

pytestmark = [pytest.mark.s3]

NUMBERS = ["-1", "0", "1e309", "nan", "99999999999999999999", "", " 5", "inf", "0x10"]
TEXTS = ["", " ", "é", "\u200fab\u202e", "😀", "x" * 10_000, "-", "/nonexistent/dir/x",
         "{dir}", "~/x", "..", "%s{}"]
# Values for the options that parse text themselves (bbox, point, times).
PARSED = {
    "bbox": ["nan,nan,nan,nan", "1e309,0,0,0", "-181,0,0,0", "0,0,0", "10,50,-10,40",
             "0,10,0,-10", "-180,-90,180,90"],
    "point": ["nan,nan", "1e309,0", "0,0,0", "181,0", "24.9,60.2"],
    "since": ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2026-13-01", "nan",
              "2026-12-01T08:00:00Z", "2026-12-01"],
}
PARSED["until"] = PARSED["since"]

# The arguments that make each command run (a value for each required argument) and
# keep it harmless (--dry-run where there is one).
BASE: dict[str, list[str]] = {
    "graph activate": ["nosuchversion"], "graph neighbors": ["S1"],
    "graph route": ["S1", "S2"], "restore dataset": ["nosuchversion"],
    "ingest-gps": ["{csv}"], "completion": ["bash"],
}


def commands() -> Iterator[tuple[str, click.Command]]:
    """(path, command) for every command of the tree, groups included."""
    def walk(cmd: click.Command, path: list[str]) -> Iterator[tuple[str, click.Command]]:
        yield " ".join(path), cmd
        if isinstance(cmd, click.Group):
            for name in sorted(cmd.list_commands(click.Context(cmd))):
                sub = cmd.get_command(click.Context(cmd), name)
                assert sub is not None
                yield from walk(sub, [*path, name])

    root.load_all()
    yield from walk(root, [])


def fuzzed(param: click.Parameter) -> list[str]:
    """The adversarial values for ``param``, by its Click type (or name, for the options
    that parse their text themselves)."""
    kind = getattr(param.type, "inner", param.type)
    if param.name in PARSED:
        return PARSED[param.name] + TEXTS
    if isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):
        return NUMBERS
    return TEXTS


def cases() -> Iterator[Any]:
    for path, cmd in commands():
        params = [p for p in cmd.params if not (isinstance(p, click.Option) and (
            p.is_flag or p.count or p.name in ("log_format", "version")))]
        if params:
            yield pytest.param(path, params, id=path or "pipeline")


def count_written(sb: Sandbox) -> dict[str, int]:
    conn = sb.connect()
    return {t: conn.execute(f"SELECT count(*) AS n FROM {t}").fetchone()["n"]  # noqa: S608
            for t in WRITTEN}


def problems(res: Any, what: str, names: list[str]) -> list[str]:
    """What is wrong with one result: an undocumented exit code, a traceback, or (on a failure)
    not exactly one error line, or a usage error that names neither option nor value."""
    text = res.output + (res.stderr or "")
    if res.exit_code not in DOCUMENTED:
        return [f"{what}: exit {res.exit_code}: {text[-600:]}"]
    if "Traceback" in text:
        return [f"{what}: traceback: {text[-1500:]}"]
    if res.exit_code == 0:
        return []
    if what.startswith("pipeline doctor") and "doctor: FAILED: " in res.output:
        return []  # doctor's answer is its table of checks, the failed ones named last
    lines = ERROR_LINE.findall(res.stderr)
    if len(lines) != 1:
        return [f"{what}: exit {res.exit_code} with {len(lines)} error lines: "
                f"{res.stderr[-600:]!r}"]
    if res.exit_code == 2 and not any(n and n[:200] in lines[0] for n in names):
        return [f"{what}: the usage error names none of {names!r:.200}: {lines[0][:300]}"]
    return []


@pytest.fixture
def world(make_sandbox: SandboxFactory, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> tuple[Sandbox, Cli, Path]:
    """A migrated, empty sandbox (OData fixture server included), run from an empty working
    directory (the fuzzed --output and --prometheus paths land there)."""
    sb = make_sandbox()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return sb, Cli(sb.env), tmp_path


@pytest.mark.parametrize("path,params", list(cases()))
def test_fuzz_options(world: tuple[Sandbox, Cli, Path], path: str,
                      params: list[click.Parameter]) -> None:
    sb, cli, tmp = world
    (tmp / "dir").mkdir()
    csv = tmp / "points.csv"
    csv.write_text("device_id,recorded_at,latitude,longitude\n")
    subst = {"{dir}": str(tmp / "dir"), "{csv}": str(csv)}
    words = path.split()
    cmd = root
    for w in words:
        cmd = cmd.get_command(click.Context(cmd), w)  # type: ignore[attr-defined]
    dry = ["--dry-run"] if any(p.name == "dry_run" for p in cmd.params) else []
    base = [subst.get(a, a) for a in BASE.get(path, [])]
    before = count_written(sb)
    found: list[str] = []
    for param in params:
        for raw in fuzzed(param):
            value = subst.get(raw, raw)
            if isinstance(param, click.Argument):
                args = list(base)
                index = [p.name for p in cmd.params if isinstance(p, click.Argument)].index(
                    param.name)
                if index < len(args):
                    args[index] = value
                else:
                    args.append(value)
                argv = [*words, *dry, *args]
            elif not words:  # an option of the root group: run the cheapest command under it
                argv = [param.opts[-1], value, "config", "show"]
            else:
                argv = [*words, *dry, param.opts[-1], value, *base]
            what = f"pipeline {' '.join(a[:40] for a in argv)}"
            try:
                res = cli(*argv)
            except Exception as exc:  # a traceback for the operator
                found.append(f"{what}: {type(exc).__name__}: {exc}"[:600])
                continue
            # A usage error names the option or its value (or a base argument, when the
            # value passed and the base argument is the one refused).
            found += problems(res, what, [*param.opts, param.human_readable_name, value.strip(),
                                          repr(value), *base])
            if res.exit_code != 0:
                after = count_written(sb)
                if after != before:
                    found.append(f"{what}: exit {res.exit_code} but wrote {after} "
                                 f"(before {before})")
            before = count_written(sb)
    assert found == [], "\n".join(found)


# ------------------------------------------------------------------ settings

# Wrong values for a setting by its type, as TOML (a file) and as text (an environment
# variable); a table or an array, a string and a date go to every setting in the file.
TOML_ANY = ["{ a = 1 }", "[1, 2]", '"abc"', "1979-05-27T07:32:00Z"]
TOML_VALUES: dict[Any, list[str]] = {
    int: ["-1", "0", "1.5", "99999999999999999999", "9223372036854775807", "nan", "true"],
    float: ["-1", "0", "1e300", "nan", "-inf", "true", '""'],
    bool: ["0", "2", '"yes"', '""'],
    str: ['""', '" "', '"\u202e😀"', '"\\r"', '"' + "x" * 10_000 + '"', '"[/x]"'],
    dict: ["5", '""'],
}
ENV_VALUES: dict[Any, list[str]] = {
    int: ["abc", "-1", "1.5", "1e309", "99999999999999999999", "9223372036854775807", "",
          " 5", "0x10", "\udce9"],
    float: ["abc", "-1", "1e309", "1e300", "nan", "inf", "", " 5", "\udce9", "[1]"],
    bool: ["abc", "2", "", " ", "\udce9"],
    str: ["", " ", "\u202e😀", "\udce9", "\r", "x" * 10_000, "[bold]"],
    dict: ["", "{", "[]", '{"bus": NaN}', '{"bus": 1e999}', '{"bus": "x"}', "5"],
}
# Values for the tables, as TOML.
TABLE_VALUES = {
    "mapping": ["{ stops = 5 }", '{ stops = { name = 5 } }', '{ stops = { "" = "x" } }',
                '{ nosuchset = { a = "b" } }', '{ stops = { entity_set = "" } }'],
    "speeds_kmh": ["{ bus = nan }", '{ bus = "fast" }', "{ bus = { a = 1 } }", "{ bus = 1e309 }",
                   "{ bus = 99999999999999999999 }", '{ "" = 5 }', "{ BUS = 5, bus = 6 }"],
    "entries": ['{ sync-odata = "bad cron" }', "{ sync-odata = 5 }",
                '{ nosuchstage = "* * * * *" }', '{ sync-odata = "99 99 * * *" }',
                '{ sync-odata = "" }'],
}


def kind(annotation: Any) -> Any:
    """int, float, bool, str or dict: the type a setting's value has when set."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is dict:
        return dict
    return kind(args[0]) if args else annotation


def settings_fields() -> list[tuple[str, str, Any, bool]]:
    """(section, key, annotation, has an environment variable) of every setting."""
    found = []
    for section, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            found.append((section, f.name, hints[f.name], bool(f.metadata.get("env", True))))
    return found


FIELDS = settings_fields()


def config_problems(res: Any, what: str, names: list[str], codes: set[int]) -> list[str]:
    """A settings case: an exit code in ``codes``, no traceback, and on exit 78 one error line
    that names the setting (doctor: its table's settings check names it)."""
    text = res.output + (res.stderr or "")
    if res.exit_code not in codes:
        return [f"{what}: exit {res.exit_code}: {text[-600:]}"]
    if "Traceback" in text:
        return [f"{what}: traceback: {text[-1500:]}"]
    if res.exit_code == 0:
        return []
    if what.startswith("doctor"):
        return [] if "doctor: FAILED: " in res.output else [f"{what}: no summary: {text[-600:]}"]
    if what.startswith("--json"):  # the error is one JSON object on stdout
        try:
            lines = [json.loads(res.stdout)["error"]]
        except (ValueError, KeyError) as exc:
            return [f"{what}: not one JSON error ({exc}): {res.stdout[-600:]!r}"]
    else:
        lines = ERROR_LINE.findall(res.stderr)
    if len(lines) != 1:
        return [f"{what}: exit {res.exit_code} with {len(lines)} error lines: "
                f"{res.stderr[-600:]!r}"]
    if res.exit_code == 78 and not any(n in lines[0] for n in names):
        return [f"{what}: the error names none of {names!r}: {lines[0][:300]}"]
    return []


def run_settings_case(env: dict[str, str], argv: list[str], what: str, names: list[str],
                      codes: set[int]) -> tuple[int | None, list[str]]:
    """(exit code or None for an exception, problems) of one settings case."""
    try:
        res = Cli(env)(*argv)
    except Exception as exc:  # a traceback for the operator
        return None, [f"{what}: {type(exc).__name__}: {exc}"[:600]]
    return res.exit_code, config_problems(res, what, names, codes)


# config show reads every setting and shows it: 0 or 78. doctor checks them and every
# system: 0, 1 (a check failed) or 78. The stages (dry runs) use them: any documented code.
SHOW, SHOW_JSON = (["config", "show"], {0, 78}), (["--json", "config", "show"], {0, 78})
DOCTOR = (["doctor"], {0, 1, 78})
STAGE = (["run-all", "--dry-run"], DOCUMENTED)
# The command that uses a section's settings beyond loading them (doctor builds every client).
USER = {"database": DOCTOR, "redis": DOCTOR, "s3": DOCTOR, "odata": DOCTOR, "osrm": DOCTOR,
        "match": STAGE, "virtual": STAGE, "graph": STAGE, "notify": STAGE, "runner": STAGE,
        # a setting taken must not fail a dry run with nothing to prune
        "retention": (["prune", "--dry-run"], {0}),
        "health": (["status"], {0, 1, 78}), "schedule": (["status"], {0, 1, 78})}
Case = tuple[dict[str, str], list[str], str, list[str]]  # env, global args, what, names


@pytest.fixture
def settings_world(make_sandbox: SandboxFactory, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[Sandbox, Path]:
    sb = make_sandbox()
    # No OSRM in this world: a port nobody listens on, so that doctor's settings check passes
    # (its osrm check fails: exit 1).
    sb.env["PIPELINE_OSRM_URL"] = "http://127.0.0.1:9"
    monkeypatch.chdir(tmp_path)
    return sb, tmp_path


def run_cases(cases: list[Case], section: str = "graph") -> list[str]:
    """A refused case through config show (every 10th through doctor and the stage too: the
    same loading path); a taken one through the command that uses ``section`` (every 3rd
    through config show too, as a table or JSON in turn)."""
    found: list[str] = []
    for i, (env, args, what, names) in enumerate(cases):
        config = args[1] if args else env.get("PIPELINE_CONFIG")
        try:  # the CLI's own loading, in-process: is the case refused?
            load_settings(config, env)
        except ConfigError:
            turn = [SHOW, DOCTOR, STAGE] if i % 10 == 0 else [SHOW]
        except Exception:  # a bug: the CLI runs below say what it is
            turn = [SHOW, DOCTOR, STAGE]
        else:
            turn = [USER[section]] + ([SHOW if i % 2 else SHOW_JSON] if i % 3 == 0 else [])
        for argv, codes in turn:
            found += run_settings_case(env, [*args, *argv], f"{' '.join(argv)}: {what}", names,
                                       codes)[1]
    return found


@pytest.mark.parametrize("section", sorted(_section_types()))
def test_fuzz_settings(settings_world: tuple[Sandbox, Path], section: str) -> None:
    """Each setting of ``section`` with each wrong value of its type, alone in the config
    file, then in its PIPELINE_* variable."""
    sb, tmp = settings_world
    cases: list[Case] = []
    for sec, key, annotation, has_env in FIELDS:
        if sec != section:
            continue
        var = env_name(section, key)
        names = [var, f"[{section}] {key}", f"{section}.{key}", key]
        values = TABLE_VALUES.get(key, []) + TOML_VALUES[kind(annotation)] + TOML_ANY
        for i, value in enumerate(values):
            path = tmp / f"{key}-{i}.toml"
            path.write_text(f"[{section}]\n{key} = {value}\n", encoding="utf-8")
            env = {k: v for k, v in sb.env.items() if k != var}
            cases.append((env, ["--config", str(path)], f"[{section}] {key} = {value:.40}",
                          names))
        for value in ENV_VALUES[kind(annotation)] if has_env else []:
            cases.append(({**sb.env, var: value}, [], f"{var}={value[:40]!r}", names))
    # A variable of the section that names no setting (a typo).
    typo = env_name(section, "nosuchkey")
    cases.append(({**sb.env, typo: "1"}, [], "a typo", [typo]))
    found = run_cases(cases, section)
    assert found == [], "\n".join(found)


def broken_files(tmp: Path) -> Iterator[tuple[str, Path]]:
    good = "[graph]\nretention = 3\n"
    cases: dict[str, bytes | None] = {
        "empty": b"",
        "a BOM": b"\xef\xbb\xbf" + good.encode(),
        "two BOMs": b"\xef\xbb\xbf\xef\xbb\xbf" + good.encode(),
        "Latin-1": "[odata]\nusername = \"J\u00e9r\u00f4me\"\n".encode("latin-1"),
        "UTF-16": good.encode("utf-16"),
        "a NUL byte": b"[graph]\nretention = 3\x00\n",
        "binary": bytes(range(256)),
        "not TOML": b"retention: 3\n",
        "a key outside a section": b"retention = 3\n",
        "an unknown section": b"[nosuch]\na = 1\n",
        "an unknown key": b"[graph]\nnosuchkey = 1\n",
        "a duplicate key": b"[graph]\nretention = 3\nretention = 4\n",
        "a section that is a value": b"graph = 3\n",
        "a section that is an array of tables": b"[[graph]]\nretention = 3\n",
        "a nested table": b"[graph.deeper]\nretention = 3\n",
        "CRLF line ends": b"[graph]\r\nretention = 3\r\n",
        "a huge file": b"[graph]\n" + b"# padding\n" * 200_000 + b"retention = 3\n",
        "a directory": None,
    }
    for name, content in cases.items():
        path = tmp / f"{name.replace(' ', '-')}.toml"
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        yield name, path
    fifo = tmp / "fifo.toml"  # nobody writes to it: opening it for reading hung
    os.mkfifo(fifo)
    yield "a named pipe", fifo
    yield "a missing file", tmp / "missing.toml"
    yield "a path through a file", tmp / "empty.toml" / "x.toml"
    yield "a relative missing path", Path("missing.toml")
    yield "a path with a tilde", Path("~/pipeline.toml")
    yield "a name that is not UTF-8", Path(os.fsdecode(bytes(tmp / "x") + b"\xe9.toml"))
    if os.geteuid() != 0:  # root reads any file
        path = tmp / "unreadable.toml"
        path.write_text(good)
        path.chmod(0)
        yield "an unreadable file", path


def test_fuzz_config_files(settings_world: tuple[Sandbox, Path]) -> None:
    """Broken config files, by --config and by PIPELINE_CONFIG."""
    sb, tmp = settings_world
    cases: list[Case] = []
    for name, path in broken_files(tmp):
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        names = [shown, "config file", "[graph]", "[nosuch]", "nosuchkey", "retention"]
        cases.append((sb.env, ["--config", str(path)], f"--config {name}", names))
        cases.append(({**sb.env, "PIPELINE_CONFIG": str(path)}, [], f"PIPELINE_CONFIG {name}",
                      names))
    found = run_cases(cases)
    assert found == [], "\n".join(found)
