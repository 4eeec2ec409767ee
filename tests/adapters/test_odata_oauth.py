"""OAuth 2.0 client credentials ([odata] token_url) against the fixture server's token
endpoint: fetched once, reused, renewed near expiry and on a 401, refusals in one line."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.odata_server import ODataServer, sample_network, status, wrong_shape
from pipeline_cli.adapters.odata import ODataClient
from pipeline_cli.errors import ConfigError, SourceError
from pipeline_cli.settings import ODataSettings, load_settings
from tests.support.clirunner import Cli

SECRET = "cc-Secret-7f3a9"
DATA = sample_network(40)


@pytest.fixture
def server() -> Iterator[ODataServer]:
    with ODataServer(DATA, page_size=7) as srv:
        srv.oauth = {"client_id": "sb-app!b12|xsuaa!b4", "client_secret": SECRET,
                     "lifetime": 3600}
        yield srv


def client(srv: ODataServer, sleep: Any = time.sleep, **kw: Any) -> ODataClient:
    opts: dict[str, Any] = {"url": srv.url, "token_url": srv.token_url,
                            "client_id": "sb-app!b12|xsuaa!b4", "client_secret": SECRET,
                            "connect_timeout": 2, "read_timeout": 5, "backoff_base": 0.01,
                            "backoff_max": 1.0}
    return ODataClient(ODataSettings(**{**opts, **kw}), sleep=sleep)


def fetch(c: ODataClient) -> list[dict[str, Any]]:
    return [row for page in c.pages("Stops", orderby="ID") for row in page.rows]


def unauthorized(srv: ODataServer) -> int:
    return sum(1 for r in srv.requests if r.path != "/token"
               and not r.headers.get("authorization", "").startswith("Bearer "))


def test_one_token_serves_every_page(server: ODataServer) -> None:
    with client(server) as c:
        assert len(fetch(c)) == 40
    tokens = server.token_requests()
    assert len(tokens) == 1 and len(server.requests) > 6  # the service document and 6 pages
    assert tokens[0].method == "POST" and tokens[0].headers["authorization"].startswith("Basic ")
    assert b"grant_type=client_credentials" in tokens[0].body and SECRET.encode() not in \
        tokens[0].body
    assert unauthorized(server) == 0


def test_the_scope_is_sent(server: ODataServer) -> None:
    server.oauth = {**(server.oauth or {}), "scope": "https://org.crm.dynamics.com/.default"}
    with client(server, scope="https://org.crm.dynamics.com/.default") as c:
        assert len(fetch(c)) == 40
    with client(server, scope="https://other/.default") as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert "HTTP 400 invalid_scope" in str(err.value) and "scope" in str(err.value)


def test_a_token_near_its_expiry_is_renewed_before_the_service_refuses_it(
        server: ODataServer) -> None:
    server.oauth = {**(server.oauth or {}), "lifetime": 2}  # renewed 1 s before it ends
    with client(server) as c:
        assert c.probe("Stops") == 1
        assert c.probe("Stops") == 1
        assert len(server.token_requests()) == 1
        time.sleep(1.2)
        assert c.probe("Stops") == 1
    assert len(server.token_requests()) == 2
    assert unauthorized(server) == 0
    # three probes, three requests: none was refused (401) and repeated
    assert len([r for r in server.requests if r.path == "/odata/Stops"]) == 3


def test_a_revoked_token_is_renewed_once_and_the_request_repeated(
        server: ODataServer) -> None:
    with client(server) as c:
        assert c.probe("Stops") == 1
        server.revoke_tokens()
        assert c.probe("Stops") == 1
    assert len(server.token_requests()) == 2
    assert len([r for r in server.requests if r.path == "/odata/Stops"]) == 3


def test_a_second_401_is_the_usual_auth_error(server: ODataServer) -> None:
    with client(server) as c:
        assert c.probe("Stops") == 1
        server.add_fault(status(401), entity_set="Stops", times=2)
        with pytest.raises(SourceError) as err:
            c.probe("Stops")
    message = str(err.value)
    assert "HTTP 401" in message and "[odata] token_url" in message and "\n" not in message
    assert len(server.token_requests()) == 2


def test_a_refused_client_is_one_line_without_secrets(server: ODataServer) -> None:
    with client(server, client_secret="wrong-" + SECRET) as c, \
            pytest.raises(SourceError) as err:
        fetch(c)
    message = str(err.value)
    assert message == (f"OData token endpoint http://127.0.0.1:{server.port}: HTTP 401 "
                       "invalid_client: Client authentication failed. Trace ID: 0f3c (check "
                       "[odata] client_id/client_secret/scope)")
    assert len(server.token_requests()) == 1  # not retried
    assert [r.path for r in server.requests] == ["/token"]


def test_server_errors_of_the_token_endpoint_are_retried(server: ODataServer) -> None:
    server.add_fault(status(503), match="/token", times=2)
    with client(server) as c:
        assert c.probe("Stops") == 1
    assert len(server.token_requests()) == 3
    server.add_fault(status(503), match="/token", times=None)
    with client(server, retries=2) as c, pytest.raises(SourceError) as err:
        c.probe("Stops")
    assert str(err.value) == (f"OData token endpoint http://127.0.0.1:{server.port}: "
                              "HTTP 503 after 2 attempts")


def test_a_token_endpoint_asking_for_a_long_wait_fails_at_once(server: ODataServer) -> None:
    """Entra ID throttles with 429 and Retry-After: a wait past [odata] backoff_max fails the
    run at once, as for the service, instead of sleeping past the cron slot."""
    slept: list[float] = []
    server.add_fault(status(429, retry_after=3600), match="/token", times=None)
    with client(server, sleep=slept.append) as c, pytest.raises(SourceError) as err:
        c.probe("Stops")
    assert str(err.value) == (f"OData token endpoint http://127.0.0.1:{server.port}: HTTP 429; "
                              "the server asks to retry after 3600 s, longer than [odata] "
                              "backoff_max (1 s)")
    assert slept == [] and len(server.token_requests()) == 1


def test_an_answer_without_access_token_is_named(server: ODataServer) -> None:
    with client(server, token_url=server.url) as c, pytest.raises(SourceError) as err:
        c.probe("Stops")  # the service document answers 401 (JSON, no access_token)
    assert "HTTP 401" in str(err.value)
    server.add_fault(status(401), match="/token")  # an OData error body, not an OAuth one
    server.add_fault(wrong_shape({"token_type": "Bearer"}), match="/token")
    with client(server) as c, pytest.raises(SourceError) as err:
        c.probe("Stops")
    assert "HTTP 401 Injected401: injected fault: HTTP 401 (check [odata] client_id" in \
        str(err.value)
    with client(server) as c, pytest.raises(SourceError) as err:
        c.probe("Stops")
    assert str(err.value).endswith(": the answer has no access_token")


def test_an_echoed_token_is_masked(server: ODataServer) -> None:
    with client(server) as c:
        token = c._bearer()
        server.add_fault(status(400, message=f"bad request with Bearer {token}"),
                         entity_set="Stops")
        with pytest.raises(SourceError) as err:
            c.probe("Stops")
    # once fetched, the token is masked as the settings' secrets are, wherever it is shown
    shown = load_settings(None, {}).redact(str(err.value))
    assert token not in shown and shown.endswith("bad request with Bearer ***")


@pytest.mark.parametrize(("env", "needle"), [
    ({"PIPELINE_ODATA_CLIENT_SECRET": SECRET}, "missing setting [odata] client_id"),
    ({"PIPELINE_ODATA_CLIENT_ID": "app"}, "missing setting [odata] client_secret"),
    ({"PIPELINE_ODATA_CLIENT_ID": "app", "PIPELINE_ODATA_CLIENT_SECRET": SECRET,
      "PIPELINE_ODATA_TOKEN": "static-token"}, "[odata] token: set either"),
    ({"PIPELINE_ODATA_TOKEN_URL": "ftp://login/token", "PIPELINE_ODATA_CLIENT_ID": "app",
      "PIPELINE_ODATA_CLIENT_SECRET": SECRET}, "[odata] token_url: expected an http"),
    ({"PIPELINE_ODATA_CLIENT_ID": "a:b", "PIPELINE_ODATA_CLIENT_SECRET": SECRET},
     "[odata] client_id: must not contain ':'"),
])
def test_config_errors_name_the_setting(env: dict[str, str], needle: str) -> None:
    environ = {"PIPELINE_ODATA_TOKEN_URL": "https://login.example/t/oauth2/v2.0/token", **env}
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ)
    assert needle in str(err.value) and err.value.exit_code == 78
    assert SECRET not in str(err.value)


def test_the_client_secret_is_masked_in_settings() -> None:
    s = load_settings(None, {"PIPELINE_ODATA_TOKEN_URL": "https://login.example/token",
                             "PIPELINE_ODATA_CLIENT_ID": "app",
                             "PIPELINE_ODATA_CLIENT_SECRET": SECRET})
    assert SECRET in s.secrets()
    assert s.redact(f"secret {SECRET} end") == "secret *** end"


# -- the CLI ------------------------------------------------------------------------------

@pytest.fixture
def cli(run_cli: Cli, full_env: dict[str, str], server: ODataServer) -> Cli:
    run_cli.env.update(full_env)
    run_cli.env.update({
        "PIPELINE_ODATA_URL": server.url, "PIPELINE_ODATA_TOKEN_URL": server.token_url,
        "PIPELINE_ODATA_CLIENT_ID": "sb-app!b12|xsuaa!b4",
        "PIPELINE_ODATA_CLIENT_SECRET": SECRET, "PIPELINE_ODATA_BACKOFF_BASE": "0.01",
        "PIPELINE_ODATA_BACKOFF_MAX": "1", "PIPELINE_ODATA_READ_TIMEOUT": "5",
    })
    return run_cli


def test_sync_and_doctor_with_client_credentials_keep_secrets_out(
        cli: Cli, server: ODataServer, database_url: str, tmp_path: Path) -> None:
    proc = cli.subprocess("sync-odata", "--json", "-v")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"]["stops"] == 40
    tokens = server.token_requests()
    assert len(tokens) == 1
    issued = server.requests[-1].headers["authorization"].removeprefix("Bearer ")
    doctor = cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["odata"]["ok"], checks["odata"]
    cli.env["PIPELINE_ODATA_CLIENT_SECRET"] = "wrong-" + SECRET
    failed = cli.subprocess("sync-odata")
    assert failed.returncode == 1 and "invalid_client" in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith("client_id/client_secret/scope)"), errors
    shown = cli.subprocess("config", "show").stdout
    output = proc.stdout + proc.stderr + doctor.output + failed.stdout + failed.stderr + shown
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT coalesce(error, '') || counts::text || result::text "
                            "|| options::text FROM stage_runs").fetchall()
    assert len(rows) == 2
    for text in [output, *(r[0] for r in rows)]:
        assert SECRET not in text and issued not in text


def test_a_fetched_token_a_service_echoes_in_a_200_body_never_leaves(
        cli: Cli, server: ODataServer, database_url: str) -> None:
    """A token fetched at run time is a secret like the settings' own: a service that quotes
    it in a value (a problem names it) or in an error object under HTTP 200 (the error line
    and the log name it) has it masked in the output, the logs and the run history."""
    token = "eyJ0eXAiOiJKV1Qi.echoed-access-token.Zm9vYmFy"
    server.oauth = {**(server.oauth or {}), "token": token}
    server.update_row("Flights", 1, daysOfWeek=f"Bearer {token}")  # a value quoting the header
    strict = cli.subprocess("-v", "sync-odata")
    assert strict.returncode == 1 and "daysOfWeek: expected" in strict.stderr, strict.stderr
    skipped = cli.subprocess("-v", "--log-format", "json", "--json", "sync-odata",
                             "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert "got 'Bearer ***'" in json.loads(skipped.stdout)["rejects"][0]
    server.add_fault(wrong_shape({"error": {"code": "Expired", "message": f"token {token} "
                                            "expired"}}), entity_set="Stops", times=None)
    failed = cli.subprocess("-v", "sync-odata")
    assert failed.returncode == 1 and "HTTP 200 Expired: token *** expired" in failed.stderr
    doctor = cli.subprocess("--json", "doctor")
    assert "token *** expired" in doctor.stdout
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT coalesce(error, '') || counts::text || result::text "
                            "|| options::text FROM stage_runs").fetchall()
    assert len(rows) == 3
    assert "Bearer ***" in rows[0][0] and "token *** expired" in rows[2][0]
    for proc in (strict, skipped, failed, doctor):
        assert token not in proc.stdout + proc.stderr
    assert all(token not in r[0] for r in rows)
