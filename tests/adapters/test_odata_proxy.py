"""The OData client through a real forward proxy: the environment's proxy variables as curl
reads them, [odata] proxy over them ("" for none), and a failing proxy named without its
password."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.odata_server import ODataServer
from devtools.procs import free_port
from pipeline_cli.errors import ConfigError, SourceError, endpoint
from pipeline_cli.settings import load_settings
from tests.adapters.test_odata import DATA, client, fetch
from tests.support.proxy import ForwardHttpProxy

SECRET = "proxy-Secret-7"
FROM_ENV = "(from the environment; [odata] proxy overrides)"


@pytest.fixture
def v4() -> Iterator[ODataServer]:
    with ODataServer(DATA, page_size=7) as srv:
        yield srv


@pytest.fixture
def proxy() -> Iterator[ForwardHttpProxy]:
    with ForwardHttpProxy() as p:
        yield p


@pytest.fixture
def guarded() -> Iterator[ForwardHttpProxy]:
    """A proxy that asks for the user etl and the password SECRET."""
    with ForwardHttpProxy(username="etl", password=SECRET) as p:
        yield p


def with_credentials(p: ForwardHttpProxy, password: str = SECRET) -> str:
    return f"http://etl:{password}@127.0.0.1:{p.port}"


@pytest.mark.parametrize("name", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
def test_every_request_goes_through_the_environments_proxy(
        v4: ODataServer, proxy: ForwardHttpProxy, monkeypatch: pytest.MonkeyPatch,
        name: str) -> None:
    monkeypatch.setenv(name, proxy.url)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")  # not for http://
    with client(v4) as c:
        assert len(fetch(c)) == 40
        assert c.via == f"proxy {proxy.url} {FROM_ENV}"
    assert len(proxy.forwarded) == len(v4.requests) == 7  # the service document, 6 pages
    assert all(target.startswith(v4.url) for target in proxy.forwarded)  # absolute URIs


@pytest.mark.parametrize(("host", "no_proxy"), [
    ("127.0.0.1", "127.0.0.1"), ("127.0.0.1", "*"), ("127.0.0.1", "example.com, 127.0.0.0/8"),
    ("localhost", "localhost:{port}"), ("localhost", "other.example,.localhost")])
@pytest.mark.parametrize("name", ["NO_PROXY", "no_proxy"])
def test_no_proxy_hosts_go_direct(v4: ODataServer, proxy: ForwardHttpProxy,
                                  monkeypatch: pytest.MonkeyPatch, host: str, no_proxy: str,
                                  name: str) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv(name, no_proxy.format(port=v4.port))
    with client(v4, url=v4.url.replace("127.0.0.1", host)) as c:
        assert len(fetch(c)) == 40 and c.via is None
    assert proxy.forwarded == []


def test_no_proxy_for_another_port_still_uses_the_proxy(
        v4: ODataServer, proxy: ForwardHttpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", f"localhost:{v4.port + 1}")
    with client(v4, url=v4.url.replace("127.0.0.1", "localhost")) as c:
        assert len(fetch(c)) == 40
    assert len(proxy.forwarded) == 7


def test_the_setting_overrides_the_environment_and_empty_means_none(
        v4: ODataServer, guarded: ForwardHttpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")  # a dead one
    with client(v4, proxy="") as c:
        assert len(fetch(c)) == 40 and c.via is None
    assert guarded.forwarded == []
    with client(v4, proxy=with_credentials(guarded)) as c:
        assert len(fetch(c)) == 40
        assert c.via == f"proxy {guarded.url} ([odata] proxy)"
    assert len(guarded.forwarded) == 7 and guarded.refused == 0


def test_an_empty_variable_means_no_proxy_and_a_proxy_url_is_checked() -> None:
    env = {"PIPELINE_ODATA_PROXY": ""}
    assert load_settings(environ=env).odata.proxy == ""
    assert load_settings(environ={}).odata.proxy is None
    env["PIPELINE_ODATA_PROXY"] = f"http://etl:{SECRET}@proxy.example:3128"
    settings = load_settings(environ=env)  # config show, and redaction everywhere
    assert dict((k, v) for k, v, _src, _doc in settings.describe())["odata.proxy"] == (
        "http://etl:***@proxy.example:3128")
    assert settings.redact(f"a body that echoes {SECRET}") == "a body that echoes ***"
    env["PIPELINE_ODATA_PROXY"] = "socks5://127.0.0.1:1080"
    with pytest.raises(ConfigError, match=r"\[odata\] proxy: expected an http:// or https://"):
        load_settings(environ=env)


def test_a_socks_proxy_from_the_environment_is_a_config_error(
        v4: ODataServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", f"socks5h://etl:{SECRET}@127.0.0.1:1080")
    with pytest.raises(ConfigError) as err:
        client(v4)
    assert str(err.value) == (f"the proxy socks5h://127.0.0.1:1080 {FROM_ENV} is not an "
                              "http:// or https:// proxy")
    assert err.value.exit_code == 78


@pytest.mark.parametrize("scheme", ["http", "https"])  # https: the 407 answers the CONNECT
def test_a_407_names_the_proxy_without_its_password_and_is_not_retried(
        v4: ODataServer, guarded: ForwardHttpProxy, monkeypatch: pytest.MonkeyPatch,
        scheme: str) -> None:
    url = v4.url.replace("http:", f"{scheme}:")
    monkeypatch.setenv(f"{scheme.upper()}_PROXY", with_credentials(guarded, "wrong-" + SECRET))
    with client(v4, url=url) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == (
        f"OData {endpoint(url)} the service document: proxy {guarded.url} {FROM_ENV}: HTTP 407 "
        "Proxy Authentication Required (it asks for a user and password: check them in its "
        "URL, http://user:password@host:port)")
    assert guarded.refused == 1 and err.value.exit_code == 1


@pytest.mark.parametrize("code", [502, 503])
def test_a_failing_proxy_is_retried_and_named(v4: ODataServer, guarded: ForwardHttpProxy,
                                              code: int) -> None:
    guarded.status = code
    with client(v4, proxy=with_credentials(guarded), retries=2) as c, \
            pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == (f"OData {endpoint(v4.url)} the service document: proxy "
                              f"{guarded.url} ([odata] proxy): HTTP {code} after 2 attempts")


def test_a_dead_proxy_port_is_named_without_its_password(
        v4: ODataServer, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("HTTP_PROXY", f"etl:{SECRET}@127.0.0.1:{port}")  # no scheme: http
    with client(v4, retries=2) as c, pytest.raises(SourceError) as err:
        fetch(c)
    assert str(err.value) == (f"OData {endpoint(v4.url)} the service document: proxy "
                              f"http://127.0.0.1:{port} {FROM_ENV}: connection failed: "
                              "connection refused after 2 attempts")


def test_the_environment_gives_a_proxy_but_no_netrc_credentials(
        v4: ODataServer, proxy: ForwardHttpProxy, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login etl password {SECRET}\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    with client(v4) as c:
        assert len(fetch(c)) == 40
    assert len(proxy.forwarded) == 7
    assert all("Authorization" not in r.headers for r in v4.requests)
