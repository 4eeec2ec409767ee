"""OData V4/V2 client: the one place that talks to the source service of ``sync-odata``.

It follows the server's paging, retries transient failures, caps pages and body sizes, and
fails with one-line SourceErrors that never put credentials in (what a server echoes, a
fetched token too, is masked by settings' redaction wherever it is shown; page shapes:
odata_format).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urljoin, urlsplit, urlunsplit
from xml.etree import ElementTree

import requests
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from ..errors import ConfigError, SourceError, endpoint, service_error
from ..readahead import ReadAhead
from ..settings import add_runtime_secret, path_hint
from .odata_format import close_name, has_field, unwrap_page

if TYPE_CHECKING:
    from ..settings import ODataSettings

__all__ = ["ODataClient", "Page", "error_line"]

log = logging.getLogger("pipeline.odata")

@dataclass(frozen=True)
class Page:
    """One page as the server sent it (``body``) and as parsed (``rows``)."""

    number: int
    rows: list[dict[str, Any]]
    body: bytes
    count: int | None  # the total from @odata.count / __count, when the server sent one


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None,
                 where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.where = where  # the URL contacted, when a redirect made it another host


_CONNECTION_FAILURES = ("Connection refused", "Name or service not known", "Connection reset",
                        "Remote end closed connection", "Connection aborted")
_AUTH, _NAMES = " (check [odata] username/password/token)", " (check the names in [odata.mapping])"
_URL = " (check [odata] url)"
_CONTEXTS = ("@odata.context", "@context", "odata.metadata")  # V4, 4.01 unprefixed, V3
_OAUTH = " (check [odata] client_id/client_secret/scope)"
_OAUTH_REFUSED = " (a fresh token from [odata] token_url was refused: check [odata] scope " \
    "and the client's access to the service)"


class _TokenRejected(Exception):
    """The service answered 401 to a fetched access token: renew it, try the request again."""

    def __init__(self, token: str) -> None:
        super().__init__("access token refused")
        self.token = token


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (urllib3 reads both), else None."""
    try:
        return float(Retry().parse_retry_after(value)) if value else None
    except (InvalidHeader, ValueError, OverflowError):
        return None


def error_line(status: int, body: bytes, content_type: str = "") -> str:
    """An OData error body (V4 ``error.message``, V2 ``error.message.value``) as one line;
    another body as its start."""
    code = message = ""
    try:
        doc = json.loads(body)
        err = doc.get("error") or doc.get("odata.error")
        if not isinstance(err, dict):  # a gateway's own JSON (Azure APIM's): shown as sent
            raise ValueError
        code = str(err.get("code") or "")
        msg = err.get("message")
        message = str(msg.get("value", "") if isinstance(msg, dict) else (msg or ""))
    except (ValueError, AttributeError, RecursionError):
        root = None
        if body.lstrip()[:1] == b"<" and b"<!" not in body:  # no DTD: no entity expansion
            with contextlib.suppress(ElementTree.ParseError):
                root = ElementTree.fromstring(body)
        if root is not None and root.tag.rpartition("}")[2] == "error":  # V2 XML (SAP)
            texts: dict[str, str] = {}
            for e in root.iter():
                texts.setdefault(e.tag.rpartition("}")[2], e.text or "")
            code, message = texts.get("code", ""), texts.get("message", "")
        elif "html" not in content_type.lower():
            message = body[:300].decode("utf-8", "replace")
    code = "" if code == str(status) else code  # not 'HTTP 401 401: Unauthorized'
    text = " ".join(f"{code}: {message}".strip(": ").split())
    return f"HTTP {status}" + (f" {text[:300]}" if text else "")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class ODataClient:
    """Reads entity sets page by page from one OData service.

    One ``requests.Session`` (pooled keep-alive connections) for the client's life; close it
    with :meth:`close` or a ``with`` block. Credentials go into the session, never into URLs
    or messages.
    """

    def __init__(self, s: ODataSettings, *, sleep: Callable[[float], None] = time.sleep
                 ) -> None:
        if not s.url:
            raise ConfigError("missing setting [odata] url (set PIPELINE_ODATA_URL or "
                              "[odata] url in the config file)", key="odata.url")
        self.settings = s
        parts = urlsplit(s.url)  # credentials in the URL go to the session, not into URLs
        self.service_url = urlunsplit(parts._replace(
            netloc=parts.netloc.rpartition("@")[2], query="", fragment="")).rstrip("/") + "/"
        # The URL's own query (SAP's sap-client=100) goes with every request that lacks it.
        self._query = parse_qsl(parts.query, keep_blank_values=True)
        self.retries = max(1, s.retries)
        # base * 2^n capped at backoff_max, plus up to base of jitter so clients spread out
        self._backoff = (wait_exponential(multiplier=s.backoff_base, max=s.backoff_max)
                         + wait_random(0, s.backoff_base))
        self._rewrite_logged = False  # logged once per client (one sync), not per page
        self._redirect_logged = False
        self._sleep = sleep
        self.session = requests.Session()
        self.session.trust_env = False  # no ~/.netrc or REQUESTS_CA_BUNDLE surprises under cron
        # ...but the proxy of the environment, as curl and pip take it (HTTPS_PROXY, NO_PROXY
        # and the rest, read by requests' own functions), unless [odata] proxy says ("": none)
        proxy = s.proxy if s.proxy is not None else requests.utils.select_proxy(
            self.service_url, requests.utils.get_environ_proxies(self.service_url))
        self.proxy = (proxy if "://" in proxy else f"http://{proxy}") if proxy else None
        self.via = self.proxy and f"proxy {endpoint(self.proxy)} " + (
            "([odata] proxy)" if s.proxy else "(from the environment; [odata] proxy overrides)")
        if self.proxy and not self.proxy.lower().startswith(("http://", "https://")):
            raise ConfigError(f"the {self.via} is not an http:// or https:// proxy",
                              key="odata.proxy")
        if self.proxy:
            self.session.proxies = {"http": self.proxy, "https": self.proxy}
        if s.ca_file:  # a private CA (trust_env ignores REQUESTS_CA_BUNDLE)
            # os.path: Path.is_file() raised "File name too long" (a traceback); this says no
            if not os.path.isfile(s.ca_file):
                raise ConfigError(f"[odata] ca_file {s.ca_file!r} is not a readable file"
                                  f"{path_hint(s.ca_file)}", key="odata.ca_file")
            self.session.verify = s.ca_file
        self.session.headers["User-Agent"] = "pipeline-cli sync-odata"
        username = s.username or (parts.username and unquote(parts.username))  # p%40ss: p@ss
        # [odata] token_url: bearer tokens by the client-credentials grant, fetched before the
        # first request and again near their expiry or on a 401 (_bearer)
        self._token_lock = threading.Lock()  # the read-ahead thread asks for tokens too
        self._access: str | None = None
        self._renew_at: float | None = None  # monotonic; None: until the service refuses it
        if s.token_url:
            pass
        elif s.token:
            self.session.headers["Authorization"] = f"Bearer {s.token}"
        elif username is not None:
            # UTF-8, as RFC 7617 says (requests would send a str as Latin-1, or fail)
            self.session.auth = requests.auth.HTTPBasicAuth(
                username.encode(), (s.password or unquote(parts.password or "")).encode())
        self._detected: str | None = None if s.version == "auto" else s.version
        self._v3 = False
        self._service_doc: Any = None
        self._metadata: list[tuple[str, ElementTree.Element]] | None = None  # declared()

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> ODataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- protocol

    @property
    def protocol(self) -> str:
        """``v4`` or ``v2``: forced by settings, else detected from the service document."""
        if self._detected is None:
            doc = self._service_doc = self._get(self.service_url, "the service document",
                                                names=_URL)[1]
            self._detected = self._shape_version(doc, "the service document")
            # OData V3 JSON light (WCF Data Services 5.x) pages like V4, but counts with
            # $inlinecount: it refused $count=true with HTTP 400.
            self._v3 = self._detected == "v4" and "odata.metadata" in doc
        return self._detected

    def _shape_version(self, doc: Any, what: str) -> str:
        if isinstance(doc, dict) and "value" in doc:
            return "v4"
        if isinstance(doc, dict) and isinstance(doc.get("d"), dict | list):
            return "v2"
        if isinstance(doc, dict) and ("error" in doc or "odata.error" in doc):  # under HTTP 200
            raise SourceError(f"OData {what}: {error_line(200, json.dumps(doc).encode())}")
        if isinstance(doc, dict) and set(_CONTEXTS) & doc.keys():
            return "v4"  # an entity: Business Central's root is a company, companies(<id>)/
        raise SourceError(f"OData {what}: not an OData JSON response (no 'value' or 'd')")

    def _headers(self) -> dict[str, str]:
        if self._detected == "v2":
            return {"Accept": "application/json", "MaxDataServiceVersion": "2.0",
                    "DataServiceVersion": "2.0"}
        headers = {
            "Accept": "application/json;odata.metadata=minimal;IEEE754Compatible=true, "
                      "application/json;q=0.9",
            "OData-MaxVersion": "4.0",
        }
        if self._detected is None or self._v3:
            headers["MaxDataServiceVersion"] = "3.0"
        if self.settings.page_size > 0:
            headers["Prefer"] = f"odata.maxpagesize={self.settings.page_size}"
        return headers

    def collection_url(self, entity_set: str, *, orderby: str | None = None,
                       select: list[str] | None = None, filter: str | None = None,
                       top: int | None = None) -> str:
        """The first-page URL: with [odata] paging = client it asks for ``$top`` rows (later
        pages add ``$skip``), else later pages come only from the server's nextLinks.
        ``orderby`` is left out with [odata] orderby = false."""
        options: list[tuple[str, str]] = []
        if filter:
            options.append(("$filter", filter))
        if select and self.settings.select:
            options.append(("$select", ",".join(select)))
        if orderby and self.settings.orderby:
            options.append(("$orderby", orderby))
        if self.settings.count:
            options.append(("$count", "true") if self.protocol == "v4" and not self._v3
                           else ("$inlinecount", "allpages"))
        if self.settings.paging == "client":
            top = top or self.settings.page_size or 1000
        return self._url(entity_set, options + ([("$top", str(top))] if top else []))

    def _url(self, entity_set: str, options: list[tuple[str, str]]) -> str:
        # A V2 service found by its JSON service document answers JSON to the Accept header
        # (WCF Data Services before 5.0 refuse $format); version = v2 skips that document.
        if self.protocol == "v2" and self.settings.version == "v2":
            options = [*options, ("$format", "json")]
        query = "&".join(f"{k}={quote(v, safe=',()*:/')}" for k, v in options)
        return f"{self.service_url}{self._path(entity_set)}" + (f"?{query}" if query else "")

    def _path(self, entity_set: str) -> str:
        """The set's URL under the service root: the ``url`` of its entry in a V4 service
        document read (name Stops, url StopSet), else its name. Messages keep the name."""
        doc = self._service_doc if isinstance(self._service_doc, dict) else {}
        url = next((e["url"] for e in doc.get("value") or () if isinstance(e, dict)
                    and e.get("name") == entity_set and isinstance(e.get("url"), str)), "")
        resolved = urljoin(self.service_url, url)  # not another host, nor above the root
        inside = resolved.startswith(self.service_url) and resolved != self.service_url
        return resolved[len(self.service_url):] if inside and url != entity_set \
            else quote(entity_set)

    def probe(self, entity_set: str, *, orderby: str | None = None,
              filter: str | None = None, select: list[str] | None = None,
              fields: list[str] | None = None) -> int:
        """GET the sync's first page with ``$top=1``: the rows (0 or 1). The row must have
        each of ``fields`` (names or paths; default ``select``)."""
        url = self.collection_url(entity_set, orderby=orderby, select=select, filter=filter,
                                  top=1)
        try:
            doc = self._get(url, f"{entity_set} $top=1")[1]
        except SourceError as exc:
            raise self._unlisted(exc, entity_set) from None
        rows, _link, _count = unwrap_page(doc, self._shape_version(doc, entity_set),
                                          f"{entity_set} $top=1", False, url)
        missing = [f for f in fields or select or () if rows and not has_field(rows[0], f)]
        if missing:  # a null left out, if $metadata declares it
            declared = self.declared(entity_set) - rows[0].keys()
            missing = [f for f in missing if f.partition("/")[0] not in declared]
        if missing:  # the server ignored $select, or a path is not the entity's
            close = close_name(missing[0], rows[0])  # as the sync says it
            raise SourceError(f"OData {entity_set} $top=1: the entity has no field {missing[0]!r}"
                              + (f" (did you mean {close!r}? {_NAMES[2:]}" if close else _NAMES))
        return len(rows)

    def declared(self, entity_set: str) -> set[str]:
        """The properties $metadata (CSDL XML) declares on the set's entity type and its base
        types: a service may leave a null property out of an entity (OData 4.01's
        omit-values=nulls, Dataverse). Empty when it cannot be read or names no such set."""
        if self._metadata is None:  # read once per client: Dataverse's is megabytes
            try:
                body = self._get(f"{self.service_url}$metadata", "$metadata", xml=True)[0]
                root = ElementTree.fromstring(body) if b"<!" not in body else None  # no DTD
            except (SourceError, ElementTree.ParseError):
                root = None
            self._metadata = [] if root is None else [
                (e.tag.rpartition("}")[2], e) for e in root.iter()]
        elements = self._metadata
        types = {e.get("Name"): e for tag, e in elements if tag == "EntityType"}
        name = next((e.get("EntityType", "") for tag, e in elements
                     if tag == "EntitySet" and e.get("Name") == entity_set), "")
        props: set[str] = set()
        while (kind := types.pop(name.rpartition(".")[2], None)) is not None:  # pop: no cycles
            props |= {str(p.get("Name")) for p in kind if p.tag.endswith("}Property")}
            name = kind.get("BaseType", "")
        return props

    # -------------------------------------------------------------------- paging

    def pages(self, entity_set: str, *, orderby: str | None = None,
              select: list[str] | None = None, filter: str | None = None) -> Iterator[Page]:
        """Every page of an entity set, in server order: following nextLinks to the end, or
        with [odata] paging = client by ``$skip`` to the first empty page.

        A background thread fetches the next two pages while the caller works on this one.
        """
        url = self.collection_url(entity_set, orderby=orderby, select=select, filter=filter)
        with ReadAhead(self._pages(entity_set, url), 2, "odata-read-ahead") as pages:
            yield from pages

    def _pages(self, entity_set: str, url: str) -> Generator[Page, None, None]:
        origin, root = _origin(self.service_url), urlsplit(self.service_url).path
        client = self.settings.paging == "client"
        # later client-driven pages: the first URL without the count (the first page's is the
        # set's; asking again would have the server count the set on every request)
        later = re.sub(r"\$(?:count=true|inlinecount=allpages)&", "", url)
        seen: set[str] = {url}
        number = received = 0
        next_url: str | None = url
        previous: list[dict[str, Any]] = []  # the rows of the page before
        while next_url is not None:
            number += 1
            if number > self.settings.max_pages:
                raise SourceError(f"OData {entity_set}: more than {self.settings.max_pages} "
                                  "pages ([odata] max_pages); " + (
                                      "raise it or [odata] page_size" if client else
                                      "the server's nextLink never ends"))
            what = f"{entity_set} page {number}"
            try:
                body, doc = self._get(next_url, what, names="" if number > 1 else _NAMES)
            except SourceError as exc:
                if number == 1 and not client and exc.details.get("too_large"):
                    raise SourceError(f"{exc}; a service that sends the whole set at once "
                                      "needs [odata] paging = \"client\"") from None
                raise self._unlisted(exc, entity_set) if number == 1 else exc from None
            page_version = self._shape_version(doc, what)
            if page_version != self.protocol:
                raise SourceError(f"OData {what}: got a {page_version.upper()} response from "
                                  f"a {self.protocol.upper()} service")
            rows, link, count = unwrap_page(doc, page_version, what, self.settings.count,
                                            next_url)
            # keys differ from page to page; under server paging the whole page must repeat
            # (a server that writes tokens it never reads), not a row that shifted onto it
            if rows and previous and (rows[0] == previous[0] if client else rows == previous):
                raise SourceError(f"OData {what}: the rows of page {number - 1} again (the "
                                  + ("server ignores $skip; [odata] paging = \"server\")"
                                     if client else "server's nextLink led back to them: a "
                                     "paging loop)"))
            yield Page(number, rows, body, count)
            previous = rows
            if client:  # by rows received: right under a server's cap; its nextLink is moot
                received += len(rows)
                next_url = f"{later}&$skip={received}" if rows else None
                continue
            if link is None:
                return
            try:  # a port past 65535 or a broken IPv6 host is a ValueError of urllib
                # a link that is only a query (SAP Datasphere's "?$skip=10") is the set's: the
                # context URL would make it $metadata's
                resolved = urljoin(next_url if link.startswith("?") else
                                   _link_base(next_url, doc), link)
                if _origin(resolved) != origin or not urlsplit(resolved).path.startswith(root):
                    resolved = self._on_service_origin(resolved, entity_set, what)
            except ValueError:
                raise SourceError(f"OData {what}: malformed nextLink {link!r}") from None
            if resolved in seen:
                raise SourceError(f"OData {what}: nextLink repeats an earlier page "
                                  "(a paging loop)")
            seen.add(resolved)
            next_url = resolved

    def _unlisted(self, exc: SourceError, entity_set: str) -> SourceError:
        """A 400/404 for a set the service document does not list (a typo in [odata.mapping]
        set): with the sets it lists, and the one closest."""
        if exc.details.get("status") not in (400, 404):
            return exc
        if urlsplit(self.service_url).path.endswith(f"/{entity_set}/"):
            return SourceError(f"{exc}; [odata] url ends with the set {entity_set!r}: give the "
                               "service root, without the set", **exc.details)
        with contextlib.suppress(SourceError):  # a version forced: the document not read yet
            self._service_doc = self._service_doc or self._get(
                self.service_url, "the service document", names=_URL)[1]
        doc = self._service_doc if isinstance(self._service_doc, dict) else {}
        d = doc.get("d")  # V2: {"d": {"EntitySets": [...]}}; V4: {"value": [{"name": ...}]}
        names = d.get("EntitySets") if isinstance(d, dict) else [
            e.get("name") for e in doc.get("value") or () if isinstance(e, dict)
            and "url" in e and e.get("kind", "EntitySet") == "EntitySet"]  # not an entity
        names = sorted(n for n in names or () if isinstance(n, str))
        if not names or entity_set in names:
            return exc
        close = close_name(entity_set, names)
        return SourceError(f"{exc}; the service document lists no set {entity_set!r} (" + (
            f"did you mean {close!r}? " if close else "") + f"it lists {', '.join(names[:12])}"
            + (", ..." if len(names) > 12 else "") + ")", **exc.details)

    def _on_service_origin(self, link: str, entity_set: str, what: str) -> str:
        """A nextLink naming another host (an internal host name behind a reverse proxy,
        ``localhost`` for ``127.0.0.1``): its path and query on the configured origin, so the
        credentials only ever go to the host of ``[odata] url``. A path outside the service
        root's (a proxy that maps /gw/odata to the gateway's /odata), on any host, is
        re-rooted there."""
        (scheme, host, port), foreign = _origin(link), _origin(link) != _origin(self.service_url)
        if foreign and self.settings.foreign_next_link == "refuse":
            raise SourceError(f"OData {what}: nextLink points to another host ({host}); "
                              "refusing to follow it ([odata] foreign_next_link = refuse)")
        parts, base = urlsplit(link), urlsplit(self.service_url)
        if foreign and not self._rewrite_logged:
            self._rewrite_logged = True
            log.info("the OData nextLinks name %s://%s:%s; following them on %s://%s "
                     "([odata] foreign_next_link = rewrite)", scheme, host, port, base.scheme,
                     base.netloc)
        path, own = parts.path, unquote(self._path(entity_set))  # raw, or %-encoded in any case
        spellings = {own, quote(own), re.sub(
            "%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(own))}
        at = max(path.rfind("/" + name) for name in spellings)
        if not path.startswith(base.path) and at >= 0:
            path = base.path + path[at + 1:]
        return urlunsplit((base.scheme, base.netloc, path, parts.query, ""))

    # -------------------------------------------------------------------- HTTP

    def _get(self, url: str, what: str, *, names: str = _NAMES, xml: bool = False
             ) -> tuple[bytes, Any]:
        """GET with retries; returns (body, parsed JSON; with ``xml``, None) or raises
        SourceError. ``names``: the setting a 400/404 blames ("" for a server's nextLink)."""
        parts = urlsplit(url)  # the URL's own query, once for all attempts
        if missing := [(k, v) for k, v in self._query if k not in dict(parse_qsl(parts.query))]:
            url = urlunsplit(parts._replace(query="&".join(filter(None, (
                parts.query, urlencode(missing, quote_via=quote))))))
        try:
            try:
                return self._retrying()(self._get_once, url, what, names, False, xml)
            except _TokenRejected as rejected:  # revoked, or expired early: once more
                with self._token_lock:
                    if self._access == rejected.token:
                        self._access = None
                log.info("the OData service refused the access token; fetching a new one")
                return self._retrying()(self._get_once, url, what, names, True, xml)
        except _Retryable as exc:
            tries = f" after {self.retries} attempts" if self.retries > 1 else ""
            line = service_error(SourceError, "OData", exc.where or self.service_url, what,
                                 exc.message)  # shortened, then the attempts added
            raise SourceError(f"{line}{tries}") from None

    def _retrying(self) -> Retrying:
        return Retrying(stop=stop_after_attempt(self.retries), wait=self._wait,
                        retry=retry_if_exception_type(_Retryable), sleep=self._sleep,
                        reraise=True)

    # -------------------------------------------------------------------- OAuth

    def _bearer(self) -> str:
        """The access token of [odata] token_url: fetched once, reused, renewed within 60 s
        of its expiry (half its lifetime for a short one)."""
        with self._token_lock:
            if self._access is None or (self._renew_at is not None
                                        and time.monotonic() >= self._renew_at):
                self._access, lifetime = self._fetch_token()
                self._renew_at = None if lifetime is None else (
                    time.monotonic() + lifetime - min(60.0, lifetime / 2))
            return self._access

    def _fetch_token(self) -> tuple[str, float | None]:
        try:
            return self._retrying()(self._fetch_token_once)
        except _Retryable as exc:
            tries = f" after {self.retries} attempts" if self.retries > 1 else ""
            raise SourceError(f"OData token endpoint {endpoint(str(self.settings.token_url))}"
                              f": {exc.message}{tries}") from None

    def _fetch_token_once(self) -> tuple[str, float | None]:
        """POST the client-credentials grant (RFC 6749 4.4); (access_token, expires_in)."""
        s = self.settings
        where = f"OData token endpoint {endpoint(str(s.token_url))}"
        form = {"grant_type": "client_credentials", **({"scope": s.scope} if s.scope else {})}
        # HTTP basic, as RFC 6749 2.3.1 prefers; the id and secret as they are (as curl -u
        # sends them): XSUAA decodes form-encoded ones only when told, Azure's need none.
        auth = requests.auth.HTTPBasicAuth(str(s.client_id).encode(),
                                           str(s.client_secret).encode())
        try:
            resp = self.session.post(str(s.token_url), data=form, auth=auth, stream=True,
                                     headers={"Accept": "application/json"},
                                     allow_redirects=False,
                                     timeout=(s.connect_timeout, s.read_timeout))
        except (requests.exceptions.SSLError, requests.exceptions.InvalidURL) as exc:
            raise SourceError(f"{where}: {_transport_text(exc)}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:  # a proxy's too
            raise _Retryable(_transport_text(exc)) from None
        except requests.RequestException as exc:
            raise SourceError(f"{where}: {_transport_text(exc)}") from None
        with resp:
            body = self._read(resp, "token", error=True)  # an answer of a few hundred bytes
        code = resp.status_code
        if code in (408, 429) or code >= 500 and code not in (501, 505):
            raise self._retryable(where, f"HTTP {code}", resp)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            doc = None
        doc = doc if isinstance(doc, dict) else {}
        if code != 200:
            if isinstance(doc.get("error"), str):  # RFC 6749 5.2: error, error_description
                text = " ".join(f"{doc['error']}: {doc.get('error_description') or ''}"
                                .strip(": ").split())
                line = f"HTTP {code} {text[:300]}"
            else:  # not an OAuth answer (a gateway's page, an OData error)
                line = error_line(code, body, resp.headers.get("Content-Type", ""))
            raise SourceError(f"{where}: {line}" + (
                _OAUTH if code in (400, 401) else " (check [odata] token_url)"))
        token = doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise SourceError(f"{where}: the answer has no access_token"
                              + ("" if doc else " (not a JSON object)"))
        # masked from now on wherever a message, log line or run record quotes it (a
        # service may echo the Authorization header, in an error or in a page)
        add_runtime_secret(token)
        if not (token.isascii() and token.isprintable()) or " " in token:
            raise SourceError(f"{where}: the access_token is not a printable ASCII word")
        if str(doc.get("token_type") or "bearer").lower() != "bearer":
            raise SourceError(f"{where}: token_type {str(doc['token_type'])[:30]!r}, not Bearer")
        try:  # a number; Azure AD v1 sent a string
            lifetime: float | None = float(doc["expires_in"])
        except (KeyError, TypeError, ValueError):
            lifetime = None  # reused until the service refuses it
        log.debug("fetched an access token from %s (expires in %s s)", endpoint(
            str(s.token_url)), lifetime)
        return token, lifetime

    def _retryable(self, where: str, line: str, resp: requests.Response) -> _Retryable:
        """A retry after the server's ``Retry-After``; SourceError when it asks for longer
        than backoff_max (rather than sleep past the cron slot)."""
        after = _retry_after(resp.headers.get("Retry-After"))
        if after is not None and after > self.settings.backoff_max:
            raise SourceError(f"{where}: {line}; the server asks to retry after {after:.0f} s, "
                              f"longer than [odata] backoff_max ({self.settings.backoff_max:g} s)")
        return _Retryable(line, after, resp.url)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        return float(self._backoff(state))

    def _redirected(self, resp: requests.Response, what: str) -> None:
        """A redirect to another origin: refused, or followed (and logged once), as set by
        [odata] foreign_next_link. requests drops the credentials on the way."""
        target = urljoin(resp.url, resp.headers.get("Location", ""))
        if not resp.is_redirect or _origin(target) == _origin(self.service_url):
            return
        if self.settings.foreign_next_link == "refuse":
            resp.close()
            raise SourceError(f"OData {what}: redirected to another host ({_origin(target)[1]}"
                              "); refusing to follow it ([odata] foreign_next_link = refuse)")
        if not self._redirect_logged:
            self._redirect_logged = True
            log.info("the OData service redirects to %s; following it ([odata] "
                     "foreign_next_link = rewrite)", endpoint(target))

    def _get_once(self, url: str, what: str, names: str, renewed: bool, xml: bool = False
                  ) -> tuple[bytes, Any]:
        headers = self._headers() | ({"Accept": "application/xml"} if xml else {})
        bearer = self._bearer() if self.settings.token_url else None
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        try:
            resp = self.session.get(url, headers=headers, stream=True, timeout=(
                self.settings.connect_timeout, self.settings.read_timeout),
                hooks={"response": lambda r, **_: self._redirected(r, what)})
        except requests.exceptions.SSLError as exc:  # a certificate or TLS setup: no retry
            raise service_error(SourceError, "OData", self.service_url, what,
                                _transport_text(exc)) from None
        except requests.exceptions.ProxyError as exc:  # 407/502 to an https CONNECT too
            tunnel = re.search(r"Tunnel connection failed: (\d+)", str(exc))
            if tunnel and tunnel.group(1) == "407":
                raise self._proxy_refused(what) from None
            raise _Retryable(f"{self.via}: " + (f"HTTP {tunnel.group(1)}" if tunnel else
                                               _transport_text(exc))) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retryable(_transport_text(exc), where=getattr(exc.request, "url", None)
                             ) from None
        except requests.RequestException as exc:
            raise service_error(SourceError, "OData", self.service_url, what,
                                _transport_text(exc)) from None
        with resp:
            content_type = resp.headers.get("Content-Type", "")
            if resp.status_code >= 300:
                body = self._read(resp, what, error=True)
                line = error_line(resp.status_code, body, content_type)
                if resp.status_code == 401 and bearer is not None and not renewed:
                    raise _TokenRejected(bearer)
                if resp.status_code == 407:
                    raise self._proxy_refused(what)
                if self.via and resp.status_code in (502, 503, 504):  # the proxy's, mostly
                    line = f"{self.via}: {line}"
                if resp.status_code in (408, 429) or resp.status_code >= 500 and \
                        resp.status_code not in (501, 505):  # not implemented: no retry
                    raise self._retryable(f"OData {what}", line, resp)
                auth = _AUTH if bearer is None else _OAUTH_REFUSED
                hint = {401: auth, 403: auth, 400: names, 404: names}.get(resp.status_code, "")
                if resp.status_code in (400, 501):
                    hint = _refused_option(hint, line, url,
                                           client_paging=self.settings.paging == "client")
                raise service_error(SourceError, "OData", resp.url, what + hint, line,
                                    status=resp.status_code)
            body = self._read(resp, what)
        if not body.strip() and (resp.status_code == 204 or  # nothing sent, nothing cut short
                                 resp.headers.get("Content-Length") == "0"):
            raise SourceError(f"OData {what}: HTTP {resp.status_code} with an empty body")
        kind = content_type.split(";")[0].strip().lower()
        if xml:
            return body, None
        if "html" in kind:
            raise SourceError(f"OData {what}: expected JSON, got {kind} (a login page or proxy "
                              "in the way?)")
        not_utf8 = f"OData {what}: a page is not UTF-8 (Content-Type: {content_type or 'none'})"
        if b"\0" in body[:4]:  # UTF-16 or -32, which json reads: NUL in the first character
            raise SourceError(not_utf8)
        try:
            return body, json.loads(body)
        except RecursionError:
            raise SourceError(f"OData {what}: JSON nested too deeply to read") from None
        except UnicodeDecodeError:  # not a body cut short: no retry
            raise SourceError(not_utf8) from None
        except ValueError as exc:
            if "xml" in kind:  # an XML answer, not a JSON body cut short: no retry
                raise SourceError(f"OData {what}: expected JSON, got {kind} (the service "
                                  "answers in XML; sync-odata reads OData JSON" + (
                                      "; for a V2 service set [odata] version = v2" if
                                      self.settings.version == "auto" and
                                      self._detected != "v4" else "") + ")") from None
            if body.lstrip()[:1] == b"<":  # markup under a JSON label: not cut short either
                text = " ".join(body.decode("utf-8", "replace").split())
                raise SourceError(f"OData {what}: expected JSON, got {kind or 'a body'} "
                                  f"starting {''.join(filter(str.isprintable, text))[:60]!r}"
                                  ) from None
            # a body cut short by a dropped connection: worth another try
            raise _Retryable(  # 'Invalid control character at' at byte 34: one 'at'
                f"malformed JSON ({exc.msg.removesuffix(' at')} at byte {exc.pos}; truncated?)"
                if isinstance(exc, json.JSONDecodeError) else "malformed JSON") from None

    def _proxy_refused(self, what: str) -> SourceError:
        """A 407: the proxy's page would say no more; no retry, the same answer would come."""
        return SourceError(f"OData {endpoint(self.service_url)} {what}: {self.via or 'a proxy'}"
                           ": HTTP 407 Proxy Authentication Required (it asks for a user and "
                           "password: check them in its URL, http://user:password@host:port)")

    def _read(self, resp: requests.Response, what: str, *, error: bool = False) -> bytes:
        """The body, up to [odata] max_response_bytes; of an error, its first 64 KiB."""
        limit = 64 * 1024 if error else self.settings.max_response_bytes
        declared = resp.headers.get("Content-Length", "")
        if not error and declared.isdigit() and int(declared) > limit:
            raise SourceError(f"OData {what}: response of {int(declared)} bytes is larger than "
                              f"[odata] max_response_bytes ({limit})", too_large=True)
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in resp.iter_content(256 * 1024):
                total += len(chunk)
                if total > limit:
                    if error:
                        break  # the start is enough
                    raise SourceError(f"OData {what}: response larger than [odata] "
                                      f"max_response_bytes ({limit})", too_large=True)
                chunks.append(chunk)
        except requests.exceptions.ContentDecodingError:  # not cut short: no retry reads it
            raise SourceError(f"OData {what}: the body is not encoded as its header Content-"
                              f"Encoding: {resp.headers.get('Content-Encoding')} says (a proxy "
                              "that decoded it?)") from None
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            raise _Retryable(f"response cut short: {_transport_text(exc)}") from None
        return b"".join(chunks)


def _link_base(url: str, doc: Any) -> str:
    """What a relative nextLink is relative to: the page's context URL (OData JSON 4.0, 4.6),
    which names the service root's $metadata, though the set lies deeper (a Business Central
    company's .../api/v2.0/companies(7)/Stops links to companies(7)/Stops?...); taken on the
    host asked, as a relative link names no other. Without one (V2), the request URL."""
    context = next((doc[k] for k in _CONTEXTS if isinstance(doc.get(k), str)), "")
    path = urlsplit(context).path
    return urljoin(url, path) if path else url


def _refused_option(hint: str, line: str, url: str, *, client_paging: bool) -> str:
    """``hint`` with the setting that leaves out a query option the server's 400/501 names
    (ASP.NET Core OData's "Query option 'Count' is not allowed", a gateway's "$orderby is not
    supported") and that we sent: $count/$inlinecount, client paging's $top/$skip, $orderby,
    V2's $format, $select (not the 'count' of 'account' or the 'top' of 'Stops'; doctor's
    $top=1 is not paging, and client paging needs $orderby)."""
    options = [(r"(?<![a-z])(?:inline)?count", "count=", "count = false if it refuses a count")]
    if client_paging:
        options.append((r"(?<![a-z])(?:top|skip)(?![a-z])", "$top=",
                        'paging = "server" if it refuses $top/$skip'))
    else:
        options.append(("orderby", "orderby=", "orderby = false leaves $orderby out"))
    options.append((r"\$format", "$format=", 'version = "auto" leaves $format out'))
    options.append((r"select'? (is )?not (allowed|supported)", "$select=",
                    "select = false leaves $select out"))  # not a name $select could not find
    for named, sent, setting in options:
        if re.search(named, line.lower()) and sent in url:
            return f"{hint[:-1]}, or [odata] {setting})" if hint else f" ([odata] {setting})"
    return hint


def _transport_text(exc: BaseException) -> str:
    """A short description of a requests error without URLs (they may carry secrets)."""
    if isinstance(exc, requests.Timeout):
        return "connect timed out" if isinstance(exc, requests.ConnectTimeout) else "timed out"
    if isinstance(exc, requests.exceptions.SSLError):  # its reason, without the URL
        why = re.search(r"\] (.+?) \(_ssl", str(exc))
        reason = why.group(1) if why else "handshake failed"
        if "certificate verify failed" in reason:  # a private CA goes in [odata] ca_file
            return ("TLS certificate verification failed" + reason.partition("failed")[2]
                    + " (a private CA: set [odata] ca_file)")
        return f"TLS error: {reason}"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection closed mid-response"
    if isinstance(exc, requests.ConnectionError):
        marker = next((m for m in _CONNECTION_FAILURES if m in str(exc)), None)
        return "connection failed" + (f": {marker.lower()}" if marker else "")
    return type(exc).__name__
