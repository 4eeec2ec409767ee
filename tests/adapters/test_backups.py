"""The S3 backup store against the real S3 server (SeaweedFS) of the test session."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest

from devtools.procs import free_port
from devtools.services import S3Endpoint
from pipeline_cli.adapters.backups import BackupStore
from pipeline_cli.app import App
from pipeline_cli.errors import BackupError
from pipeline_cli.settings import load_settings

pytestmark = pytest.mark.s3


def test_concurrent_first_uploads_create_the_bucket_once(s3: S3Endpoint, s3_bucket: str,
                                                         tmp_path: Path) -> None:
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region)
    files = []
    for i in range(8):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x" * (i + 1))
        files.append(path)
    with ThreadPoolExecutor(len(files)) as pool:
        list(pool.map(lambda p: store.put_file(f"t/{p.name}", str(p)), files))
    assert sorted(store.list("t/")) == sorted(f"t/{p.name}" for p in files)


def test_s3_down_is_one_short_line_naming_the_endpoint(s3: S3Endpoint, s3_bucket: str) -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there: a stopped S3
    store = BackupStore.connect(endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region, timeout=2)
    with pytest.raises(BackupError) as err:
        store.put_json("datasets/ds-v1/manifest.json", {"a": 1})
    message = str(err.value)
    assert message.startswith(f"S3 {endpoint} ") and message.endswith(": connection refused")
    assert "\n" not in message and len(message) < 200
    assert s3.secret_key not in message and "X-Amz" not in message and "?" not in message


@pytest.mark.parametrize("call", ["put", "stat", "get"])
@pytest.mark.parametrize("wrong", ["access_key", "secret_key"])
def test_wrong_credentials_name_the_setting_to_check(s3: S3Endpoint, s3_bucket: str,
                                                     wrong: str, call: str) -> None:
    # "AccessDenied (check [s3] access_key/secret_key)" left the operator guessing which one:
    # a stat or bucket check is a HEAD, whose 403 carries no code saying why.
    secret = "wrong-Secret-77"
    access, key = ("nosuchkey", s3.secret_key) if wrong == "access_key" else (
        s3.access_key, secret)
    store = BackupStore.connect(s3.endpoint, access, key, s3_bucket, retries=0)
    calls = {"put": lambda: store.put_bytes("x", b"x"),
             "stat": lambda: store.exists("x"), "get": lambda: store.get_bytes("x")}
    with pytest.raises(BackupError) as err:
        calls[call]()
    message = str(err.value)
    code = "InvalidAccessKeyId" if wrong == "access_key" else "SignatureDoesNotMatch"
    assert f": {code}: " in message and message.endswith(f"(check [s3] {wrong})"), message
    assert "\n" not in message and secret not in message and s3.secret_key not in message


@pytest.mark.parametrize(("action", "call"), [
    ("s3:PutObject", lambda store: store.put_bytes("datasets/ds-v1/manifest.json", b"{}")),
    ("s3:DeleteObject", lambda store: store.delete_prefix("datasets/ds-v1/")),
    ("s3:GetObject", lambda store: store.exists("datasets/ds-v1/manifest.json")),
])
def test_an_action_the_credentials_may_not_do_is_named(
        s3: S3Endpoint, s3_bucket: str, s3_deny: Callable[..., None], action: str,
        call: Callable[[BackupStore], object]) -> None:
    # Credentials that may write but not delete (or read only) read "AccessDenied (check
    # [s3] access_key/secret_key)": the keys were right, a permission was missing.
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region, retries=0, prefix="city-a")
    store.put_bytes("datasets/ds-v1/manifest.json", b"{}")
    s3_deny(action)
    with pytest.raises(BackupError) as err:
        call(store)
    message = str(err.value)
    assert message.endswith(
        f"AccessDenied: the credentials of [s3] access_key may not {action} in bucket "
        f"'{s3_bucket}', prefix 'city-a/' (the S3 user's or bucket's policy)"), message
    assert "\n" not in message and "secret_key" not in message


def test_a_key_prefix_keeps_every_key_under_it(s3: S3Endpoint, s3_bucket: str) -> None:
    """[s3] prefix: two installations on one bucket each write under a prefix of their own;
    the stages' keys (and those PostgreSQL records) stay relative to it."""
    plain = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region)
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region, prefix="/city-b/")
    assert store.prefix == "city-b/" and store.location == f"bucket '{s3_bucket}', prefix 'city-b/'"
    assert store.get_json_if_any("graphs/graph-v1/manifest.json") is None  # no bucket yet
    assert list(store.list("graphs/")) == []
    plain.put_json("graphs/graph-v1/manifest.json", {"deployment": "a"})
    store.put_json("graphs/graph-v1/manifest.json", {"deployment": "b"})
    store.put_bytes("graphs/graph-v1/graph.jsonl.gz", b"x")
    assert sorted(plain.list("")) == ["city-b/graphs/graph-v1/graph.jsonl.gz",
                                      "city-b/graphs/graph-v1/manifest.json",
                                      "graphs/graph-v1/manifest.json"]
    assert sorted(store.list("graphs/")) == ["graphs/graph-v1/graph.jsonl.gz",
                                             "graphs/graph-v1/manifest.json"]
    assert store.get_json_if_any("graphs/graph-v1/manifest.json") == {"deployment": "b"}
    assert store.exists("graphs/graph-v1/graph.jsonl.gz")
    assert store.delete_prefix("graphs/graph-v1/") == 2
    assert plain.get_json("graphs/graph-v1/manifest.json") == {"deployment": "a"}
    with pytest.raises(BackupError, match="download of city-b/graphs/graph-v1/manifest.json"):
        store.get_json("graphs/graph-v1/manifest.json")


def test_secure_against_a_plain_http_server_says_so(s3: S3Endpoint, s3_bucket: str) -> None:
    # [s3] secure = true against a plain-HTTP S3: urllib3's 'Max retries exceeded with url
    # ... WRONG_VERSION_NUMBER', 200 characters, did not say TLS was the trouble.
    if s3.secure:
        pytest.skip("the test S3 speaks TLS")
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=True, region=s3.region, timeout=5)
    started = time.monotonic()
    with pytest.raises(BackupError) as err:
        store.put_bytes("x", b"x")
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert "does not speak TLS" in message and "\n" not in message, message
    assert s3.secret_key not in message and "HTTPSConnectionPool" not in message


def test_a_bucket_that_does_not_exist_is_named_with_what_to_do(s3: S3Endpoint,
                                                               s3_bucket: str) -> None:
    # A restore from a mistyped bucket read "NoSuchBucket: The specified bucket does not
    # exist": which one, and what now?
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region, retries=0)
    for read in (lambda: store.get_json("datasets/ds-v1/manifest.json"),
                 lambda: store.delete("datasets/ds-v1/manifest.json")):
        with pytest.raises(BackupError) as err:
            read()
        assert f"bucket {s3_bucket!r} does not exist" in str(err.value), str(err.value)
        assert "[s3] bucket" in str(err.value) and "\n" not in str(err.value)


def test_an_endpoint_with_a_trailing_slash(s3: S3Endpoint, s3_bucket: str) -> None:
    store = BackupStore.connect(s3.endpoint + "/", s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region)
    store.put_bytes("x", b"x")
    assert store.get_bytes("x") == b"x"


def test_an_endpoint_pasted_with_its_scheme(s3: S3Endpoint, s3_bucket: str) -> None:
    # [s3] endpoint = "http://host:port", as boto3, aws-cli and mc take it, was refused; the
    # App hands the minio client host:port and the scheme's secure.
    scheme = "https" if s3.secure else "http"
    app = App(_settings=load_settings(environ={
        "PIPELINE_S3_ENDPOINT": f"{scheme}://{s3.endpoint}/", "PIPELINE_S3_BUCKET": s3_bucket,
        "PIPELINE_S3_ACCESS_KEY": s3.access_key, "PIPELINE_S3_SECRET_KEY": s3.secret_key,
        "PIPELINE_S3_REGION": s3.region}))
    store = app.backups()
    store.put_bytes("x", b"x")
    assert store.get_bytes("x") == b"x"
    assert store.endpoint == s3.endpoint + "/"


def test_listing_and_deleting_see_past_the_first_page_of_1000(s3: S3Endpoint,
                                                              s3_bucket: str) -> None:
    # ListObjects answers at most 1000 keys a page (SeaweedFS, as AWS): prune's listing of a
    # dataset prefix must follow the continuation, or it would leave objects behind.
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region, prefix="city-a")
    store.put_bytes("datasets/ds-v2/manifest.json", b"{}")
    keys = [f"datasets/ds-v1/virtual/gen-1/part-{i:05d}" for i in range(1005)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: store.put_bytes(key, b""), keys))
    assert sorted(store.list("datasets/ds-v1/")) == keys
    assert store.delete_prefix("datasets/ds-v1/") == 1005
    assert list(store.list("datasets/")) == ["datasets/ds-v2/manifest.json"]


@pytest.mark.parametrize("call", ["stat", "put"])
def test_a_clock_far_off_the_servers_says_so(s3: S3Endpoint, s3_bucket: str, call: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # SeaweedFS, as AWS, refuses a request signed more than 15 minutes off its clock. To a
    # HEAD (stat, bucket check) that was "AccessDenied (check [s3] access_key/secret_key)".
    # The client signs with this host's clock, set an hour back here; the server is real.
    import minio.time

    real = minio.time.utcnow
    store = BackupStore.connect(s3.endpoint, s3.access_key, s3.secret_key, s3_bucket,
                                secure=s3.secure, region=s3.region, retries=0)
    with monkeypatch.context() as patch, pytest.raises(BackupError) as err:
        patch.setattr(minio.time, "utcnow", lambda: real() - timedelta(hours=1))
        store.exists("x") if call == "stat" else store.put_bytes("x", b"x")
    message = str(err.value)
    assert message.endswith(": RequestTimeTooSkewed: this host's clock and the S3 server's "
                            "differ by more than 15 minutes: check NTP on both"), message
