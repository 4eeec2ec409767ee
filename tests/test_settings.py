"""Settings: TOML + environment, one-line errors naming the key, secrets masked."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline_cli.errors import ConfigError
from pipeline_cli.settings import load_settings, markdown_reference, mask_passwords


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def test_defaults_without_file() -> None:
    s = load_settings(None, {})
    assert s.redis.prefix == "pipeline"
    assert s.osrm.profile == "driving"
    assert s.match.chunk_size == 100
    assert s.database.url is None


def test_env_overrides_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[redis]\nprefix = "fromfile"\n[match]\ngap_seconds = 120\n')
    s = load_settings(path, {"PIPELINE_REDIS_PREFIX": "fromenv"})
    assert s.redis.prefix == "fromenv"
    assert s.match.gap_seconds == 120
    assert s.sources["redis.prefix"] == "env PIPELINE_REDIS_PREFIX"
    assert s.sources["match.gap_seconds"].startswith("file ")


def test_config_file_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[s3]\nbucket = "b01"\nsecure = true\n')
    s = load_settings(None, {"PIPELINE_CONFIG": str(path)})
    assert s.s3.bucket == "b01" and s.s3.secure is True


DOCS = Path(__file__).parents[1]


@pytest.mark.parametrize("doc", ["README.md", *sorted(
    str(p.relative_to(DOCS)) for p in (DOCS / "docs").glob("*.md"))])
def test_toml_examples_in_the_docs_load(doc: str, tmp_path: Path) -> None:
    """docs/operations.md's [schedule] example split an inline table over two lines: pasted
    as written, every command exited 78 (malformed config file)."""
    blocks = (DOCS / doc).read_text().split("```toml\n")[1:]
    for block in blocks:
        load_settings(write(tmp_path, block.split("```")[0]), {})


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[match]\ngap_seconds = 'soon'\n", {}, "gap_seconds"),
        ("", {"PIPELINE_MATCH_GAP_SECONDS": "abc"}, "PIPELINE_MATCH_GAP_SECONDS"),
        ("", {"PIPELINE_S3_SECURE": "maybe"}, "PIPELINE_S3_SECURE"),
        ("[redis]\nurl = 'http://x'\n", {}, "[redis] url"),
        ("[nonsense]\na = 1\n", {}, "[nonsense]"),
        ("[odata]\nusernme = 'x'\n", {}, "usernme"),
        ("[odata\n", {}, "malformed config file"),
        ("", {"PIPELINE_ODATA_VERSION": "v3"}, "[odata] version"),
        ("", {"PIPELINE_ODATA_FOREIGN_NEXT_LINK": "maybe"}, "[odata] foreign_next_link"),
        ("", {"PIPELINE_S3_ENDPOINT": "s3://h:9000"}, "[s3] endpoint"),
        ("", {"PIPELINE_VIRTUAL_GRID_REACH_KM": "0"}, "[virtual] grid_reach_km"),
        ("[runner]\ntimeout_sync_odata = 0\n", {}, "[runner] timeout_sync_odata"),
        ("", {"PIPELINE_DATABASE_POOLER": "session"}, "[database] pooler"),
        ("", {"PIPELINE_REDIS_CLUSTER": "maybe"}, "PIPELINE_REDIS_CLUSTER"),
        ("", {"PIPELINE_ODATA_URL": "http://u:pw@h:99999/odata/"},
         "[odata] url: port out of range 0-65535"),
        ("", {"PIPELINE_OSRM_URL": "http://h:port/"}, "[osrm] url: port could not be cast"),
        ("", {"PIPELINE_ODATA_URL": "https:///odata/"}, "[odata] url: no host name"),
        ("", {"PIPELINE_ODATA_BACKOFF_BASE": "-1"}, "[odata] backoff_base"),
        # A typo in a variable's name was ignored in silence (the file's were errors).
        ("", {"PIPELINE_MATCH_GAP_SECOND": "60"},
         "unknown setting PIPELINE_MATCH_GAP_SECOND in the environment (did you mean "
         "PIPELINE_MATCH_GAP_SECONDS?)"),
        ("", {"PIPELINE_ODATA_MAPPING": "{}"}, "[odata] mapping can be set only in the config"),
        # ... and so was one in the section's name, or in the case: the job ran on defaults.
        ("", {"PIPELINE_DATABSE_URL": "postgresql://h/x"}, "unknown setting "
         "PIPELINE_DATABSE_URL in the environment (did you mean PIPELINE_DATABASE_URL?)"),
        ("", {"PIPELINE_SE_BUCKET": "b01"}, "(did you mean PIPELINE_S3_BUCKET?)"),
        ("", {"PIPELINE_database_url": "x"}, "(did you mean PIPELINE_DATABASE_URL?)"),
        # Infinite or oversized values failed the run after all its work, or as a traceback.
        ("[virtual]\nmax_route_km = inf\n", {}, "[virtual] max_route_km: expected a finite"),
        ("", {"PIPELINE_VIRTUAL_SPEEDS_KMH": '{"bus": 1e999}'}, "SPEEDS_KMH.bus: expected a "
         "finite number"),
        ("", {"PIPELINE_VIRTUAL_MAIN_SPACING_KM": "1e300"}, "[virtual] main_spacing_km: must "
         "be at most half"),
        ("", {"PIPELINE_VIRTUAL_HEADWAY_S": "99999999999"}, "[virtual] headway_s: must be at "
         "most a day"),
        # A main grid coarser than the longest route left its points without routes between
        # them: 13 components of a 15-node graph, and gen-virtual said success.
        ("", {"PIPELINE_VIRTUAL_MAIN_SPACING_KM": "100"}, "[virtual] max_route_km: must be "
         "at least 141.4 km (1.414 x main_spacing_km = 100"),
        # A reach shorter than the spacing left stops without a main grid point: two stops
        # got no virtual stop at all, and build-graph failed on an empty graph.
        ("", {"PIPELINE_VIRTUAL_GRID_REACH_KM": "10"}, "[virtual] grid_reach_km: must be at "
         "least main_spacing_km (50)"),
        # Durations that overflowed date arithmetic: "internal error: OverflowError" after a
        # recorded run, or a traceback from status.
        ("", {"PIPELINE_RETENTION_RUNS_DAYS": "99999999"}, "[retention] runs_days: must be at "
         "most 36,500 (100 years)"),
        ("", {"PIPELINE_RUNNER_TIMEOUT_PRUNE": "1e300"}, "[runner] timeout_prune: must be at "
         "most 315,360,000"),
        ("", {"PIPELINE_HEALTH_OVERDUE_GRACE_S": "99999999999999999999"},
         "[health] overdue_grace_s: must be at most"),
        ("", {"PIPELINE_HEALTH_SYNC_AGE_CRITICAL_H": "1e9"}, "[health] sync_age_critical_h"),
        ("", {"PIPELINE_REDIS_SOCKET_TIMEOUT": "-1"}, "[redis] socket_timeout: must be positive"),
        ("", {"PIPELINE_DATABASE_CONNECT_TIMEOUT": "0"}, "[database] connect_timeout: must be"),
        # What the drivers would refuse only when connecting, as a traceback or exit 1.
        ("", {"PIPELINE_REDIS_URL": "redis://:pw@127.0.0.1:notaport/0"},
         "[redis] url: port could not be cast"),
        ("", {"PIPELINE_REDIS_URL": "redis://:pw@[::1/0"}, "[redis] url: invalid ipv6 url"),
        ("", {"PIPELINE_REDIS_URL": "redis://h:6379/abc"}, "[redis] url: the database must"),
        ("", {"PIPELINE_S3_ENDPOINT": "127.0.0.1:abc"}, "[s3] endpoint: port could not be"),
        ("", {"PIPELINE_S3_BUCKET": "Bad_Bucket!"}, "[s3] bucket: an S3 bucket name is"),
        ("", {"PIPELINE_S3_BUCKET": "Pipeline"}, "[s3] bucket: an S3 bucket name is 3-63 lower"),
        # What the minio client refuses when called: "internal error: ValueError", exit 1.
        ("", {"PIPELINE_S3_BUCKET": "pipe..line"}, "[s3] bucket: no two dots in a row, nor"),
        ("", {"PIPELINE_S3_BUCKET": "pipe.-line"}, "[s3] bucket: no two dots in a row, nor"),
        ("", {"PIPELINE_S3_BUCKET": "192.168.1.10"}, "[s3] bucket: must not look like an IP"),
        ("", {"PIPELINE_S3_PREFIX": "city a"}, "[s3] prefix: expected segments of letters"),
        ("", {"PIPELINE_S3_PREFIX": "a//b"}, "[s3] prefix: expected segments"),
        ("", {"PIPELINE_S3_PREFIX": "a/../b"}, "[s3] prefix: expected segments"),
        ("", {"PIPELINE_ODATA_PAGE_SIZE": "-1"}, "[odata] page_size: must be 0"),
        ("", {"PIPELINE_ODATA_PAGING": "skip"}, "[odata] paging: expected server or client"),
        # $skip over an order the server may change between requests loses and repeats rows
        ("[odata]\npaging = 'client'\norderby = false\n", {}, "malformed setting [odata] "
         "paging: 'client' needs [odata] orderby = true: $skip needs a stable order"),
        # A token an HTTP header cannot hold was "internal error: UnicodeEncodeError" or
        # sent with its pasted newline or zero-width space.
        ("", {"PIPELINE_ODATA_TOKEN": "abc\u200bdef"}, "[odata] token: must be printable"),
        ("", {"PIPELINE_ODATA_TOKEN": "abcdef\n"},
         "PIPELINE_ODATA_TOKEN: holds the control character '\\n'"),
        ("[odata]\ntoken = 'caf\u00e9'\n", {}, "[odata] token: must be printable"),
        ("", {"PIPELINE_DATABASE_URL": "postgresql://u@h:99999/x"},
         "[database] url: port must be 1 to 65535 (write"),
        ("", {"PIPELINE_DATABASE_URL": "postgresql://u@h/x?sslmode=bogus"},
         "[database] url: sslmode must be one of"),
        ("", {"PIPELINE_DATABASE_URL": "postgresql://u:pw@[::1:5999/x"},
         "[database] url: end of string reached"),
        ("", {"PIPELINE_DATABASE_URL": "postgres://u:QSEC@RET6@127.0.0.1/x"},
         "[database] url: a host name cannot hold '@' (write an @ in the user name or "
         "password as %40)"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                   needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), env)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 78


def test_other_pipeline_variables_are_not_taken_for_typos() -> None:
    # A variable of another tool (Azure Pipelines' PIPELINE_WORKSPACE) or of the test harness
    # is far from every setting's name: only a near miss is an error.
    env = {"PIPELINE_WORKSPACE": "/w", "PIPELINE_ID": "7", "PIPELINE_CONFIG": "",
           "PIPELINE_TEST_S3_SECRET_KEY": "k", "PIPELINE_TEST_DATABASE_URL": "x",
           "PIPELINE_LOCAL_DIR": "/l"}
    assert load_settings(None, env).s3.bucket


def test_a_relative_config_path_in_a_removed_working_directory_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A job whose directory was removed under it (a deploy swapped it) read "(relative to
    # the working directory ?: give the full path)".
    gone = tmp_path / "release-41"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(ConfigError) as err:
        load_settings("etc/pipeline.toml", {})
    assert str(err.value) == ("config file not found: etc/pipeline.toml (relative to the "
                              "working directory, which was removed: give the full path)")


def test_url_schemes_are_case_insensitive() -> None:
    # HTTP://host/... was refused with exit 78.
    assert load_settings(None, {"PIPELINE_ODATA_URL": "HTTP://h:8080/odata/"}).odata.url


def test_a_system_query_option_in_the_odata_url_is_refused() -> None:
    # The URL's query goes with every request: a $top there cut every set at 5 rows (with
    # count = false in silence, the rest deleted from the read model); a $filter or $skip
    # was "specified more than once" beside the sync's own.
    for option in ("$top=5", "%24skip=10", "$filter=Active%20eq%20true", "$orderby=ID"):
        with pytest.raises(ConfigError) as err:
            load_settings(None, {"PIPELINE_ODATA_URL": f"https://h/odata/?sap-client=100&{option}"})
        name = option.split("=")[0].replace("%24", "$")
        assert str(err.value) == (
            f"malformed setting [odata] url: its query holds the system query option {name!r}, "
            "which would go with every request; a filter goes in [odata.mapping.<table>] "
            "filter, and paging is the sync's")
    for url in ("https://h/odata/$metadata", "https://h/odata/%24metadata/?sap-client=100"):
        with pytest.raises(ConfigError, match=r"\[odata\] url: ends with \$metadata, the "
                           r"service's schema: give the service root, without it$"):
            load_settings(None, {"PIPELINE_ODATA_URL": url})
    for url in ("https://h/odata/?sap-client=100&$format=json", "https://h/odata/?company=X"):
        assert load_settings(None, {"PIPELINE_ODATA_URL": url}).odata.url == url


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\xff\xfe bad\n")
    with pytest.raises(ConfigError, match="malformed config file .*bad.toml: not UTF-8"):
        load_settings(path, {})


def test_a_config_file_not_in_utf8_names_the_line(tmp_path: Path) -> None:
    # "not UTF-8 (byte 43)": an operator counts lines, not bytes.
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[redis]\nprefix = "x"\n\n[s3]\nregion = "S\xe4o Paulo"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path, {})
    assert str(err.value).endswith("latin1.toml: not UTF-8 at line 5, column 12 (byte 0xe4; "
                                   "saved in Latin-1?)")


def test_secrets_stay_out_of_malformed_url_messages() -> None:
    for url in ("postgres://u:QSEC@RET6@127.0.0.1/x", "postgresql://u:QSEC@[::1:5999/x"):
        with pytest.raises(ConfigError) as err:
            load_settings(None, {"PIPELINE_DATABASE_URL": url})
        assert "QSEC" not in str(err.value) and "RET6" not in str(err.value)


@pytest.mark.parametrize(("env", "secret"), [
    ({"PIPELINE_DATABASE_URL": "postgresql://postgres:100%SecretTail99@127.0.0.1:5432/x"},
     "SecretTail99"),
    ({"PIPELINE_DATABASE_URL": "postgresql://postgres:MyDbPw/rest@127.0.0.1:5432/x"}, "MyDbPw"),
    ({"PIPELINE_REDIS_URL": "redis://:Pa#ssSecret@127.0.0.1:6379/0"}, "Pa"),
    ({"PIPELINE_ODATA_URL": "https://etl:Pa#ssSecret@odata.example/svc"}, "Pa"),
])
def test_a_malformed_url_is_named_without_its_content(env: dict[str, str], secret: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env)
    assert "url:" in str(err.value) and "percent-encoded" in str(err.value)
    assert secret not in str(err.value).replace("Pass", "")


@pytest.mark.parametrize(("env", "needle"), [
    ({"PIPELINE_REDIS_PREFIX": "h3-d\r"}, "PIPELINE_REDIS_PREFIX: holds the control character "
     "'\\r' (an env file with CRLF line ends?)"),
    ({"PIPELINE_OSRM_URL": "http://h:5000\t"}, "PIPELINE_OSRM_URL: holds the control character"),
    ({"PIPELINE_REDIS_PREFIX": "h3-c\udce9"}, "PIPELINE_REDIS_PREFIX: not valid UTF-8"),
    ({"PIPELINE_DATABASE_URL": "postgresql://u:p\udce4@h/x"}, "PIPELINE_DATABASE_URL: not valid"),
    ({"PIPELINE_S3_BUCKET": ""}, "PIPELINE_S3_BUCKET: must not be empty"),
    ({"PIPELINE_OSRM_PROFILE": ""}, "PIPELINE_OSRM_PROFILE: must not be empty"),
    ({"PIPELINE_S3_REGION": ""}, "PIPELINE_S3_REGION: must not be empty"),
    ({"PIPELINE_OSRM_PROFILE": "car/x"}, "[osrm] profile: expected a profile name"),
    ({"PIPELINE_OSRM_RETRY_WAIT_MAX": "-1"}, "[osrm] retry_wait_max: must not be negative"),
    ({"PIPELINE_HEALTH_OVERDUE_GRACE_S": "-1"}, "[health] overdue_grace_s: must not be negative"),
    ({"PIPELINE_HEALTH_OVERDUE_CRITICAL_S": "-5"}, "[health] overdue_critical_s: must not be"),
    ({"PIPELINE_HEALTH_RUNNING_WARNING_S": "-5"}, "[health] running_warning_s: must not be"),
    # Beyond a bigint: prune failed in every run with "database error ... bigint out of range"
    ({"PIPELINE_RETENTION_DATASETS": "99999999999999999999"},
     "[retention] datasets: must be at most 9,223,372,036,854,775,807"),
    ({"PIPELINE_RETENTION_CHUNK_SIZE": "9223372036854775808"},
     "[retention] chunk_size: must be at most 9,223,372,036,854,775,807"),
    # A wait beyond time.sleep's range: "internal error: OverflowError" at the first retry
    ({"PIPELINE_ODATA_BACKOFF_BASE": "1e300", "PIPELINE_ODATA_BACKOFF_MAX": "1e300"},
     "[odata] backoff_base: must be at most 315,360,000"),
    ({"PIPELINE_ODATA_BACKOFF_MAX": "1e300"}, "[odata] backoff_max: must be at most 315,360,000"),
    ({"PIPELINE_OSRM_RETRY_WAIT_MAX": "1e300"}, "[osrm] retry_wait_max: must be at most"),
    # urllib3 fills a pool of this many slots before the first OSRM request (10**7: 15 s)
    ({"PIPELINE_MATCH_CONCURRENCY": "1000000000"},
     "[match] concurrency: must be at most 256 (as --concurrency)"),
])
def test_unusable_text_and_numbers_are_refused(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, env)
    assert needle in str(err.value)


LONG = "x" * 10_000


@pytest.mark.parametrize(("text", "env"), [
    ("", {"PIPELINE_MATCH_CONCURRENCY": LONG}), ("", {"PIPELINE_MATCH_RADIUS_M": LONG}),
    ("", {"PIPELINE_REDIS_CLUSTER": LONG}), (f'[virtual]\nservice_start = "{LONG}"\n', {}),
    (f"[match]\n{LONG} = 1\n", {}), (f'[virtual]\nspeeds_kmh = {{"{LONG}" = 0}}\n', {}),
])
def test_a_long_value_is_quoted_cut_short(tmp_path: Path, text: str,
                                          env: dict[str, str]) -> None:
    # A 10 kB value (a pasted file, a runaway variable) made a 10 kB one-line error.
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), env)
    assert "x" * 60 + "…" in str(err.value) or "x" * 60 + "'…" in str(err.value)
    assert "(10000 characters)" in str(err.value) and len(str(err.value)) < 300


@pytest.mark.parametrize(("text", "env", "needle"), [
    ('[schedule]\nentries = {"sync-odata" = "every day"}\n', {},
     "[schedule] entries: invalid cron expression 'every day' for sync-odata"),
    ('[schedule]\nentries = {"sync-data" = "0 3 * * *"}\n', {},
     "[schedule] entries: unknown stage 'sync-data' (expected one of sync-odata, "),
    ("", {"PIPELINE_SCHEDULE_ENTRIES": '{"prune": "0 0 31 2 *"}'},
     "[schedule] entries: a cron expression that never fires '0 0 31 2 *' for prune"),
    ("", {"PIPELINE_SCHEDULE_ENTRIES": '{"prune": "0 3 * * * 30"}'},
     "[schedule] entries: not 5 time fields in the cron expression '0 3 * * * 30' for prune"),
    # croniter reads them as '0 * * * *' and '0 3 * * 1': once, whatever the step said
    ('[schedule]\nentries = {"sync-odata" = "*/1000 * * * *"}\n', {},
     "[schedule] entries: step 1000 too large for the minute field (0-59) in the cron "
     "expression '*/1000 * * * *' for sync-odata"),
    ("", {"PIPELINE_SCHEDULE_ENTRIES": '{"prune": "0 3 * * 1,1-5/7"}'},
     "[schedule] entries: step 7 too large for the day-of-week field (0-6) in the cron "
     "expression '0 3 * * 1,1-5/7' for prune"),
])
def test_a_schedule_entry_status_cannot_use_is_refused_at_load(
        tmp_path: Path, text: str, env: dict[str, str], needle: str) -> None:
    # `config show` and every stage accepted it; `status` then exited 78 on it.
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), env)
    assert needle in str(err.value) and err.value.exit_code == 78


def test_a_control_character_in_the_file_is_refused_but_not_in_a_mapping(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[s3\] region: holds the control character"):
        load_settings(write(tmp_path, '[s3]\nregion = "eu\\r"\n'), {})
    with pytest.raises(ConfigError, match=r"\[s3\] bucket: must not be empty"):
        load_settings(write(tmp_path, '[s3]\nbucket = ""\n'), {})
    # a key prefix may be empty: the keys of today, as before the setting existed
    assert load_settings(write(tmp_path, '[s3]\nprefix = ""\n'), {}).s3.prefix == ""
    assert load_settings(None, {"PIPELINE_S3_PREFIX": ""}).s3.prefix == ""
    assert load_settings(None, {"PIPELINE_S3_PREFIX": "/city-a/"}).s3.prefix == "/city-a/"


def test_a_key_outside_any_section_and_a_bom(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="setting gap_seconds in .* is outside any section"):
        load_settings(write(tmp_path, "gap_seconds = 1\n[match]\n"), {})
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff[match]\ngap_seconds = 120\n".encode())
    assert load_settings(path, {}).match.gap_seconds == 120


def test_a_config_path_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError,
                       match=r"cannot read config file .*: not a file to read \(a directory\)"):
        load_settings(None, {"PIPELINE_CONFIG": str(tmp_path)})


def test_libpq_passwords_are_masked_where_libpq_ends_them() -> None:
    cases = {
        "host=h password=Sec,retTail12345 dbname=x": "host=h password=*** dbname=x",
        "host=h password=Sec;retTail12345 dbname=x": "host=h password=*** dbname=x",
        "host=h password=Sec&retTail12345 dbname=x": "host=h password=*** dbname=x",
        "host=h password=Sec)retTail12345 dbname=x": "host=h password=*** dbname=x",
        "host=h sslpassword=KeyPass12345 dbname=x": "host=h sslpassword=*** dbname=x",
        "postgresql://postgres:Pa#ssSecret@127.0.0.1/x": "postgresql://postgres:***@127.0.0.1/x",
        "postgresql://postgres:Pa?ss@127.0.0.1/x": "postgresql://postgres:***@127.0.0.1/x",
        "postgresql://u@h/x?sslpassword=KeyPass12345": "postgresql://u@h/x?sslpassword=***",
    }
    for url, masked in cases.items():
        s = load_settings(None, {"PIPELINE_DATABASE_URL": url})
        shown = {k: v for k, v, _src, _doc in s.describe()}
        typed = {k: v for k, v, _src, _doc in s.describe(typed=True)}
        assert shown["database.url"] == masked == typed["database.url"], url
        for leak in ("retTail", "KeyPass", "ssSecret", "Pa?ss"):
            assert leak not in s.redact(f"cannot connect: {url} (password {url.split('=')[-1]})")


def test_basic_auth_header_and_azure_keys_are_redacted() -> None:
    s = load_settings(None, {"PIPELINE_ODATA_USERNAME": "etl",
                             "PIPELINE_ODATA_PASSWORD": "Basic-Secret-77"})
    header = "Authorization: Basic ZXRsOkJhc2ljLVNlY3JldC03Nw=="
    assert s.redact(f"HTTP 500: echo {header}") == "HTTP 500: echo Authorization: Basic ***"
    in_url = load_settings(None, {"PIPELINE_ODATA_URL": "https://etl:Basic-Secret-77@o.example/"})
    assert in_url.redact(header) == "Authorization: Basic ***"
    assert mask_passwords("https://f.example/api/x?code=AzF1234&subscription-key=K99") == (
        "https://f.example/api/x?code=***&subscription-key=***")


def test_require_names_env_variable() -> None:
    with pytest.raises(ConfigError, match="PIPELINE_DATABASE_URL"):
        load_settings(None, {}).require("database", "url")


def test_mask_url_and_redaction() -> None:
    assert mask_passwords("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_passwords("redis://h:6379/0") == "redis://h:6379/0"
    # A service's credential in its URL's query (config show printed it).
    assert mask_passwords("https://h/odata/?sap-client=100&api_key=K3y0nly") == (
        "https://h/odata/?sap-client=100&api_key=***")
    assert mask_passwords("http://h/x?token=T0ken#top") == "http://h/x?token=***#top"
    s = load_settings(None, {
        "PIPELINE_DATABASE_URL": "postgresql://u:topsecret@h/db",
        "PIPELINE_S3_SECRET_KEY": "s3secretvalue",
        "PIPELINE_ODATA_TOKEN": "tok-123456",
    })
    text = "failed postgresql://u:topsecret@h/db s3secretvalue Bearer tok-123456"
    redacted = s.redact(text)
    for secret in ("topsecret", "s3secretvalue", "tok-123456"):
        assert secret not in redacted
    shown = {k: v for k, v, _src, _doc in s.describe()}
    assert shown["database.url"] == "postgresql://u:***@h/db"
    assert shown["s3.secret_key"] == "***"
    assert shown["odata.token"] == "***"


@pytest.mark.parametrize("secret", ["o", "in"])
def test_short_secrets_leave_ordinary_text_alone(secret: str) -> None:
    s = load_settings(None, {
        "PIPELINE_ODATA_PASSWORD": secret, "PIPELINE_S3_SECRET_KEY": secret,
        "PIPELINE_DATABASE_URL": f"postgresql://u:{secret}@h/db",
    })
    text = ("sync-odata has never succeeded: no dataset yet\n"
            "Stops: 400 rows in 1 pages; done in 2 s (info)")
    assert s.redact(text) == text
    # where the structure says "this is a password", it is masked whatever its length
    assert s.redact(f"at postgresql://u:{secret}@h/db, redis://:{secret}@r:6379/0 and "
                    f"host=h password={secret} dbname=d") == (
        "at postgresql://u:***@h/db, redis://:***@r:6379/0 and host=h password=*** dbname=d")


def test_long_secrets_are_masked_as_whole_values(conn: psycopg.Connection[Any]) -> None:
    token = "tok-" + secrets.token_urlsafe(16)
    s = load_settings(None, {"PIPELINE_ODATA_TOKEN": token,
                             "PIPELINE_REDIS_URL": "redis://:r3dis-Pass-77@127.0.0.1:6379/0"})
    with pytest.raises(psycopg.Error) as err:  # a driver's exception that quotes the value
        conn.execute("SELECT %s::int", (token,))
    assert token in str(err.value)
    assert s.redact(str(err.value)) == str(err.value).replace(token, "***")
    assert s.redact("AUTH r3dis-Pass-77 failed") == "AUTH *** failed"
    assert s.redact(f"GET http://etl:{token}@odata/x?password={token}&a=1") == (
        "GET http://etl:***@odata/x?password=***&a=1")
    # part of a longer word is not the value: left as it is
    assert s.redact(f"x{token}y") == f"x{token}y"


def test_every_setting_is_documented() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert markdown_reference().strip() in docs, "run `make docs` to regenerate the table"


def test_a_config_path_with_a_tilde_nobody_expanded_says_so() -> None:
    # PIPELINE_CONFIG=~/pipeline.toml in a crontab or a systemd EnvironmentFile, which do not
    # expand it: "config file not found: ~/pipeline.toml", and the file is right there.
    with pytest.raises(ConfigError) as raised:
        load_settings(None, environ={"PIPELINE_CONFIG": "~/no-such-pipeline.toml"})
    assert str(raised.value) == (
        "config file not found: ~/no-such-pipeline.toml (a ~ is expanded by a shell, not by"
        " a crontab or a systemd EnvironmentFile: give the full path)")


@pytest.mark.parametrize(("endpoint", "needle"), [
    ("s3://bucket", "expected host:port, http://host:port or https://host:port"),
    ("https://", "expected host:port, http://host:port or https://host:port"),
    ("https://s3.example.com/bucket", "without a path"),
    # said "without a scheme" for an endpoint that has none
    ("minio:9000/s3", "without a path (S3 serves buckets from the endpoint's root)"),
    ("minio:9000/s3/", "without a path"),
])
def test_an_s3_endpoint_with_a_scheme_or_path_says_which(endpoint: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"PIPELINE_S3_ENDPOINT": endpoint})
    assert needle in str(err.value) and "[s3] endpoint" in str(err.value)


def test_an_s3_endpoint_with_a_trailing_slash_is_taken() -> None:
    assert load_settings(None, {"PIPELINE_S3_ENDPOINT": "minio:9000/"}).s3.endpoint


@pytest.mark.parametrize(("endpoint", "host", "secure"), [
    ("http://127.0.0.1:8333", "127.0.0.1:8333", False),
    ("https://s3.example.com/", "s3.example.com/", True),
    ("HTTPS://s3.example.com:9000", "s3.example.com:9000", True),
])
def test_an_s3_endpoint_with_a_scheme_sets_secure(tmp_path: Path, endpoint: str, host: str,
                                                  secure: bool) -> None:
    # The form boto3, aws-cli and mc take, so operators paste it: it was refused ("without a
    # scheme (use [s3] secure)"). The minio client takes host:port and secure apart.
    path = write(tmp_path, f"[s3]\nendpoint = '{endpoint}'\n")
    for s in (load_settings(path, {}), load_settings(None, {"PIPELINE_S3_ENDPOINT": endpoint})):
        assert (s.s3.endpoint, s.s3.secure) == (host, secure)
        shown = {name: (value, source) for name, value, source, _ in s.describe()}
        assert shown["s3.endpoint"][0] == host
        assert shown["s3.secure"][1].endswith(f"(the {endpoint[:endpoint.index(':')].lower()}"
                                              ":// of [s3] endpoint)")
    # set explicitly to the same, it is taken
    agreeing = load_settings(path, {"PIPELINE_S3_SECURE": str(secure).lower()})
    assert (agreeing.s3.endpoint, agreeing.s3.secure) == (host, secure)
    assert agreeing.sources["s3.secure"] == "env PIPELINE_S3_SECURE"


@pytest.mark.parametrize(("text", "env", "message"), [
    ("[s3]\nendpoint = 'https://s3.example.com'\nsecure = false\n", {},
     "conflicting settings: [s3] endpoint starts with https:// but [s3] secure is false "
     "(drop one)"),
    ("[s3]\nendpoint = 'http://127.0.0.1:8333'\n", {"PIPELINE_S3_SECURE": "true"},
     "conflicting settings: [s3] endpoint starts with http:// but PIPELINE_S3_SECURE is true "
     "(drop one)"),
    ("[s3]\nsecure = true\n", {"PIPELINE_S3_ENDPOINT": "http://127.0.0.1:8333"},
     "conflicting settings: PIPELINE_S3_ENDPOINT starts with http:// but [s3] secure is true "
     "(drop one)"),
])
def test_an_s3_scheme_contradicting_secure_names_both(tmp_path: Path, text: str,
                                                      env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), env)
    assert str(err.value) == message


def test_an_s3_endpoint_with_credentials_is_refused_without_showing_them() -> None:
    # A pasted http://user:password@host:9000 reached the minio client, whose refusal
    # ("S3 endpoint 'user:password@host:9000' is unusable") doctor printed, password and all.
    for endpoint in ("http://key:s3cr3t-pw@minio:9000", "key:s3cr3t-pw@minio:9000"):
        with pytest.raises(ConfigError) as err:
            load_settings(None, {"PIPELINE_S3_ENDPOINT": endpoint})
        assert str(err.value) == ("malformed setting [s3] endpoint: expected host:port without "
                                  "a user or password (set [s3] access_key and secret_key)")
