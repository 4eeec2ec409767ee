"""Settings: TOML + environment, one-line errors naming the key, secrets masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_cli.errors import ConfigError
from pipeline_cli.settings import load_settings, markdown_reference, mask_url


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
    path = write(tmp_path, '[s3]\nbucket = "b1"\nsecure = true\n')
    s = load_settings(None, {"PIPELINE_CONFIG": str(path)})
    assert s.s3.bucket == "b1" and s.s3.secure is True


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
        ("", {"PIPELINE_S3_ENDPOINT": "http://h:9000"}, "[s3] endpoint"),
        ("[runner]\ntimeout_sync_odata = 0\n", {}, "[runner] timeout_sync_odata"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                   needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), env)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 78


def test_require_names_env_variable() -> None:
    with pytest.raises(ConfigError, match="PIPELINE_DATABASE_URL"):
        load_settings(None, {}).require("database", "url")


def test_mask_url_and_redaction() -> None:
    assert mask_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"
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


def test_every_setting_is_documented() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert markdown_reference().strip() in docs, "run `make docs` to regenerate the table"
