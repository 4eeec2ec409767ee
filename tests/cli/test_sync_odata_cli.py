"""The sync-odata, datasets and restore commands, in-process and as the installed script."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.odata_server import ODataServer, delay, sample_network, trippin_airports
from devtools.procs import free_port
from devtools.services import S3Endpoint
from pipeline_cli import db
from tests.support.clirunner import Cli
from tests.support.proxy import ForwardHttpProxy

pytestmark = pytest.mark.s3


@pytest.fixture
def server() -> Iterator[ODataServer]:
    with ODataServer(sample_network(30), page_size=20, username="etl",
                     password="cli-Secret-42") as srv:
        yield srv


@pytest.fixture
def cli(run_cli: Cli, full_env: dict[str, str], server: ODataServer) -> Cli:
    run_cli.env.update(full_env)
    run_cli.env.update({
        "PIPELINE_ODATA_URL": server.url, "PIPELINE_ODATA_USERNAME": "etl",
        "PIPELINE_ODATA_PASSWORD": "cli-Secret-42", "PIPELINE_ODATA_BACKOFF_BASE": "0.01",
        "PIPELINE_ODATA_BACKOFF_MAX": "1", "PIPELINE_ODATA_READ_TIMEOUT": "5",
    })
    return run_cli


def as_json(output: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(output)
    return result


def test_sync_json_keys_then_noop(cli: Cli, server: ODataServer) -> None:
    res = cli("sync-odata", "--json")
    assert res.exit_code == 0, res.output
    out = as_json(res.stdout)
    assert out["status"] == "success" and out["dataset_version"] == "ds-v1"
    assert out["counts"] == {"stops": 30, "routes": 60, "flights": 9, "rejected": 0}
    assert out["inserted"] == {"stops": 30, "routes": 60, "flights": 9}
    assert out["updated"] == out["deleted"] == {"stops": 0, "routes": 0, "flights": 0}
    server.shuffle("Stops")
    again = as_json(cli("sync-odata", "--json").stdout)
    assert again["status"] == "noop" and again["dataset_version"] == "ds-v1"


def test_human_output_and_datasets_list_and_restore(cli: Cli, server: ODataServer) -> None:
    res = cli("sync-odata")
    assert res.exit_code == 0 and "sync-odata: success" in res.stdout
    assert "ds-v1 active: stops +30" in res.stdout
    server.update_row("Stops", 2, name="Other name")
    assert cli("sync-odata", "--json").exit_code == 0
    listed = as_json(cli("datasets", "list", "--json").stdout)["datasets"]
    assert [(d["version"], d["active"]) for d in listed] == [("ds-v2", True), ("ds-v1", False)]
    table = cli("datasets", "list").stdout
    assert "ds-v2" in table and "+0 ~1 -0" in table
    res = cli("restore", "dataset", "ds-v1", "--json")
    assert res.exit_code == 0, res.output
    out = as_json(res.stdout)
    assert out["dataset_version"] == "ds-v3" and out["restored_from"] == "ds-v1"
    assert out["hash"] == listed[1]["hash"] and out["updated"]["stops"] == 1
    # A typo is a usage error, not a failed sync-odata run (three made status CRITICAL).
    runs = as_json(cli("status", "--json").stdout)["stages"]["sync-odata"]
    bad = cli("restore", "dataset", "ds-v42")
    assert bad.exit_code == 2 and "unknown dataset version 'ds-v42'" in bad.output
    assert as_json(cli("status", "--json").stdout)["stages"]["sync-odata"] == runs


def test_a_failed_restore_names_the_command_the_operator_ran(
        cli: Cli, s3: S3Endpoint, s3_bucket: str) -> None:
    """docs/operations.md: every error is one line naming the command. A restore whose backup
    is gone said `pipeline sync-odata: error: ...` (the stage it is recorded as), so the line
    an operator greps for after `pipeline restore dataset` was not there."""
    from pipeline_cli.adapters.backups import BackupStore

    assert cli("sync-odata").exit_code == 0
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region)
    store.delete("datasets/ds-v1/manifest.json")
    res = cli("restore", "dataset", "ds-v1")
    assert res.exit_code == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline restore dataset: error: S3 "), res.stderr
    assert "datasets/ds-v1/manifest.json" in last

def test_strict_validation_failure(cli: Cli, server: ODataServer, database_url: str) -> None:
    server.update_row("Stops", 4, latitude=123.0)
    res = cli("sync-odata")
    assert res.exit_code == 1
    assert "validation failed: 1 problem(s) (Stops: 1 out of range)" in res.stderr
    assert "  - Stops[ID=4] latitude: 123.0 is outside -90..90" in res.stderr
    out = as_json(cli("sync-odata", "--json").stdout)
    assert out["status"] == "failed" and out["exit_code"] == 1
    assert out["problems"] == ["Stops[ID=4] latitude: 123.0 is outside -90..90"]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM datasets").fetchone() == (0,)
    skipped = as_json(cli("sync-odata", "--skip-invalid", "--json").stdout)
    assert skipped["status"] == "success" and skipped["counts"]["rejected"] >= 1


def test_a_feed_cannot_forge_lines_in_the_error_output(cli: Cli, server: ODataServer) -> None:
    # A newline in a key or value printed a line of the feed's choosing below the error.
    server.update_row("Stops", 4, latitude="95\r\nFAKE: all good")
    res = cli("sync-odata")
    assert res.exit_code == 1
    assert not any(line.startswith("FAKE") for line in res.stderr.splitlines())
    assert "expected a number, got '95\\r\\nFAKE: all good'" in res.stderr
    out = as_json(cli("sync-odata", "--json").stdout)  # JSON keeps the text as it is
    assert out["problems"] == ["Stops[ID=4] latitude: expected a number, got "
                               "'95\r\nFAKE: all good'"]


def test_dry_run_needs_no_s3_and_writes_nothing(cli: Cli, database_url: str) -> None:
    for key in [k for k in cli.env if k.startswith("PIPELINE_S3_")]:
        del cli.env[key]
    out = as_json(cli("sync-odata", "--dry-run", "--json").stdout)
    assert out["status"] == "skipped" and out["dry_run"] is True
    assert out["inserted"]["stops"] == 30 and out["dataset_version"] is None
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM stops").fetchone() == (0,)


def test_dry_run_is_not_a_run_and_keeps_the_failure_streak(cli: Cli, database_url: str) -> None:
    cli.env["PIPELINE_ODATA_PASSWORD"] = "wrong"
    assert cli("sync-odata").exit_code == 1
    cli.env["PIPELINE_ODATA_PASSWORD"] = "cli-Secret-42"
    out = as_json(cli("sync-odata", "--dry-run", "--json").stdout)
    assert out["status"] == "skipped" and out["dry_run"] is True
    stage = as_json(cli("status", "--json").stdout)["stages"]["sync-odata"]
    assert stage["last_status"] == "failed" and stage["consecutive_failures"] == 1
    assert "HTTP 401" in stage["last_error"]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT status, options->>'dry_run' FROM stage_runs").fetchall()
    assert rows == [("failed", "false")]


@pytest.mark.timeout(120, method="thread")  # the runner's hard limit owns SIGALRM
def test_hard_limit_ends_a_sync_hung_on_the_source(cli: Cli, server: ODataServer) -> None:
    server.add_fault(delay(600), entity_set="Routes", times=None)  # answers after 10 min
    cli.env.update({"PIPELINE_ODATA_READ_TIMEOUT": "900",
                    "PIPELINE_RUNNER_TIMEOUT_SYNC_ODATA": "2"})
    res = cli("sync-odata", "--json")
    assert res.exit_code == 124
    out = as_json(res.stdout)
    error = "hard limit of 2 s passed ([runner] timeout_sync_odata)"
    assert out["status"] == "failed" and out["error"] == error
    status = cli("status")
    assert f"sync-odata last run failed: {error}" in status.stdout


def test_lock_busy_exits_75(cli: Cli, database_url: str) -> None:
    assert cli("sync-odata").exit_code == 0  # ds-v1, for the restore
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (db.advisory_key("sync-odata"),))
        res = cli("sync-odata", "--json")
        assert res.exit_code == 75
        assert as_json(res.stdout)["status"] == "busy"
        assert cli("restore", "dataset", "ds-v1").exit_code == 75


def test_installed_script_with_a_mapping_file_keeps_secrets_out(
        cli: Cli, server: ODataServer, database_url: str, tmp_path: Path) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text('[odata.mapping.stops]\nfilter = "ID ne 30"\n'
                      '[odata.mapping.stops.fields]\ncity = ""\n')
    cli.env["PIPELINE_CONFIG"] = str(config)
    server.add_row("Routes", {"ID": 61, "fromStop_ID": 30, "toStop_ID": 1})
    proc = cli.subprocess("sync-odata", "--skip-invalid", "--json")
    assert proc.returncode == 0, proc.stderr
    out = as_json(proc.stdout)
    assert out["counts"]["stops"] == 29 and out["counts"]["rejected"] >= 1
    cli.env["PIPELINE_ODATA_PASSWORD"] = "wrong-cli-Secret-42"
    proc = cli.subprocess("sync-odata")
    assert proc.returncode == 1 and "HTTP 401" in proc.stderr
    assert "cli-Secret-42" not in proc.stderr + proc.stdout
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT coalesce(error, '') || counts::text || result::text "
                            "|| options::text FROM stage_runs").fetchall()
    assert rows and not any("cli-Secret-42" in r[0] for r in rows)
    help_text = cli.subprocess("sync-odata", "--help").stdout
    assert "--skip-invalid" in help_text and "--dry-run" in help_text


def test_a_path_mapping_from_the_config_file(cli: Cli, database_url: str,
                                            tmp_path: Path) -> None:
    config = tmp_path / "pipeline.toml"
    cli.env["PIPELINE_CONFIG"] = str(config)

    def mapping(latitude: str, id_: str = "IcaoCode") -> None:
        config.write_text('[odata.mapping.stops]\nset = "Airports"\n'
                          f'[odata.mapping.stops.fields]\nid = "{id_}"\nname = "Name"\n'
                          f'latitude = "{latitude}"\nlongitude = "Location/Loc/coordinates/0"\n'
                          'city = "Location/City/Name"\nis_airport = ""\n')

    data = sample_network(30)
    with ODataServer({"Airports": trippin_airports(data["Stops"]), "Routes": data["Routes"],
                      "Flights": data["Flights"]}, version="v2", keys={"Airports": "IcaoCode"},
                     username="etl", password="cli-Secret-42") as srv:
        cli.env["PIPELINE_ODATA_URL"] = srv.url
        mapping("Location/Loc/coordinates/1")
        out = as_json(cli("sync-odata", "--json").stdout)
        assert out["status"] == "success" and out["counts"]["stops"] == 30, out
        for latitude, id_, why in (
                ("Location/Loc/coordinates/-1", "IcaoCode", "latitude must be a field name or "
                 "a path of names and array indexes (Location/City/Name), got "
                 "'Location/Loc/coordinates/-1'"),
                ("Location/Loc/coordinates/1", "Location/Code", "id is the key: a property "
                 "name, not a path, got 'Location/Code'")):
            mapping(latitude, id_)
            res = cli("sync-odata")
            assert res.exit_code == 78, res.output
            assert f"malformed setting [odata.mapping.stops.fields]: {why}" in res.stderr
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT latitude, city FROM stops WHERE id = '2'").fetchone()
        assert row == (data["Stops"][1]["latitude"], data["Stops"][1]["city"])
        assert conn.execute("SELECT count(*) FROM stage_runs").fetchone() == (1,)


def test_v2_next_links_on_another_host_sync_from_the_configured_one(
        cli: Cli, database_url: str) -> None:
    # A V2 service configured as 127.0.0.1 whose __next links name localhost (as a reverse
    # proxy or the service's own host name would): the whole feed comes from 127.0.0.1.
    with ODataServer(sample_network(30), version="v2", page_size=7, username="etl",
                     password="cli-Secret-42",
                     next_link_base="http://localhost:{port}/odata/") as v2:
        cli.env["PIPELINE_ODATA_URL"] = v2.url
        out = as_json(cli("sync-odata", "--json").stdout)
        assert out["status"] == "success", out
        assert out["counts"] == {"stops": 30, "routes": 60, "flights": 9, "rejected": 0}
        assert all(r.target.startswith("/odata/") for r in v2.requests)

        v2.update_row("Stops", 2, name="Other name")
        cli.env["PIPELINE_ODATA_FOREIGN_NEXT_LINK"] = "refuse"
        res = cli("sync-odata")
        assert res.exit_code == 1, res.output
        lines = res.stderr.strip().splitlines()
        assert lines[-1] == ("pipeline sync-odata: error: OData Stops page 1: nextLink points "
                             "to another host (localhost); refusing to follow it ([odata] "
                             "foreign_next_link = refuse)")
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM datasets").fetchone() == (1,)
            row = conn.execute("SELECT name FROM stops WHERE id = '2'").fetchone()
            assert row is not None and row[0] != "Other name"


def test_a_two_character_password_is_not_masked_in_ordinary_text(
        run_cli: Cli, full_env: dict[str, str]) -> None:
    with ODataServer(sample_network(30), page_size=20, username="etl", password="in") as srv:
        run_cli.env.update({**full_env, "PIPELINE_ODATA_URL": srv.url,
                            "PIPELINE_ODATA_USERNAME": "etl", "PIPELINE_ODATA_PASSWORD": "in"})
        result = run_cli.subprocess("sync-odata")
    assert result.returncode == 0, result.stderr
    assert "Stops: 30 rows in 2 pages" in result.stderr
    assert "***" not in result.stdout + result.stderr


def test_s3_down_is_one_line_in_the_error_and_in_status(cli: Cli) -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # a stopped S3
    cli.env["PIPELINE_S3_ENDPOINT"] = endpoint
    result = cli.subprocess("sync-odata")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"pipeline sync-odata: error: S3 {endpoint} "), error
    assert error.endswith(": connection refused") and len(error) < 200
    status = cli.subprocess("status").stdout
    assert f"S3 {endpoint} " in status and max(map(len, status.splitlines())) < 200


def test_a_sync_through_the_environments_proxy_keeps_its_password_out(
        cli: Cli, server: ODataServer) -> None:
    secret = "proxy-Secret-5"
    with ForwardHttpProxy(username="etl", password=secret) as proxy:
        cli.env["http_proxy"] = f"http://etl:{secret}@127.0.0.1:{proxy.port}"
        ok = cli.subprocess("-v", "sync-odata")
        assert ok.returncode == 0, ok.stderr
        assert len(proxy.forwarded) == server.request_count() > 3
        cli.env["http_proxy"] = f"http://etl:{secret}@127.0.0.1:{free_port()}"
        failed = cli.subprocess("-v", "sync-odata")
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1].endswith(
        "(from the environment; [odata] proxy overrides): connection failed: connection "
        "refused after 5 attempts"), failed.stderr
    assert secret not in ok.stdout + ok.stderr + failed.stdout + failed.stderr


def test_a_service_that_does_not_page_points_at_client_paging(
        cli: Cli, server: ODataServer) -> None:
    server.server_paging = False  # each set in one answer, larger than the cap
    cli.env["PIPELINE_ODATA_MAX_RESPONSE_BYTES"] = "3000"
    res = cli("sync-odata")
    assert res.exit_code == 1
    error = res.stderr.strip().splitlines()[-1]
    assert "OData Stops page 1: response of " in error and error.endswith(
        ' bytes is larger than [odata] max_response_bytes (3000); a service that sends the '
        'whole set at once needs [odata] paging = "client"'), res.stderr
    cli.env.update({"PIPELINE_ODATA_PAGING": "client", "PIPELINE_ODATA_PAGE_SIZE": "10"})
    out = as_json(cli("sync-odata", "--json").stdout)
    assert out["status"] == "success"
    assert out["counts"] == {"stops": 30, "routes": 60, "flights": 9, "rejected": 0}
    cli.env["PIPELINE_ODATA_ORDERBY"] = "false"  # $skip over an order that may change
    requests = server.request_count()
    bad = cli("sync-odata")
    assert bad.exit_code == 78 and bad.stderr.strip().splitlines()[-1].endswith(
        "malformed setting [odata] paging: 'client' needs [odata] orderby = true: $skip "
        "needs a stable order"), bad.stderr
    assert server.request_count() == requests


def test_read_only_s3_credentials_fail_the_sync_before_it_commits(
        cli: Cli, conn: psycopg.Connection[dict[str, Any]],
        s3_deny: Callable[..., None]) -> None:
    # A version never exists without its backup; the line names the action refused, not
    # the keys (they were right).
    s3_deny("s3:PutObject")
    result = cli.subprocess("sync-odata")
    assert result.returncode == 78  # a policy to fix, as a setting: the next run fails alike
    error = result.stderr.strip().splitlines()[-1]
    assert " upload of datasets/ds-v1/" in error and error.endswith(
        "AccessDenied: the credentials of [s3] access_key may not s3:PutObject in bucket "
        f"'{cli.env['PIPELINE_S3_BUCKET']}' (the S3 user's or bucket's policy)"), error
    assert conn.execute("SELECT count(*) AS n FROM datasets").fetchone() == {"n": 0}
    run = conn.execute("SELECT status, error FROM stage_runs").fetchone()
    assert run is not None and run["status"] == "failed" and "s3:PutObject" in run["error"]
    doctor = cli("doctor", "--json")
    s3 = next(c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "s3")
    assert s3["ok"] is False and "may not s3:PutObject" in s3["detail"], s3


def test_an_orphan_upload_is_overwritten_without_delete_rights(
        cli: Cli, conn: psycopg.Connection[dict[str, Any]],
        s3_deny: Callable[..., None]) -> None:
    # A run that failed after its raw uploads leaves them under ds-v1/; the next run writes
    # over them, which S3 allows with PutObject alone.
    s3_deny("s3:PutObject", key="datasets/ds-v1/manifest.json")
    assert cli("sync-odata").exit_code == 78  # refused by a policy
    s3_deny("s3:DeleteObject")
    result = cli("sync-odata", "--json")
    assert result.exit_code == 0, result.output
    assert as_json(result.stdout)["dataset_version"] == "ds-v1"
