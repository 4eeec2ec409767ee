"""Fault-injection proxies that sit between the pipeline and a real server in tests.

:class:`TcpProxy` forwards raw TCP (PostgreSQL, Redis) and can cut every connection;
:class:`CountingHttpProxy` forwards HTTP/1.1 (OSRM) and counts requests by path;
:class:`ForwardHttpProxy` is a forward proxy (``HTTP_PROXY``) that can ask for credentials.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import selectors
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

LOOPBACK = "127.0.0.1"
# Paths are counted up to this length: OSRM paths carry every coordinate and can be huge.
_COUNTED_PATH_CHARS = 256
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "proxy-connection",
})


def _reset(sock: socket.socket) -> None:
    """Close with RST, so the peer sees an error at once rather than a clean EOF later."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Switch:
    """The shared part of both proxies: blocked flag and the live client sockets to cut."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocked = False
        self._closed = False
        self._live: set[socket.socket] = set()

    @property
    def blocked(self) -> bool:
        with self._lock:
            return self._blocked

    def admit(self, sock: socket.socket) -> bool:
        """Track a new client socket; False (and the socket is reset) while blocked."""
        with self._lock:
            if not (self._blocked or self._closed):
                self._live.add(sock)
                return True
        _reset(sock)
        return False

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            self._live.discard(sock)

    def block(self) -> None:
        with self._lock:
            self._blocked = True
            live = list(self._live)
        for sock in live:
            _reset(sock)

    def unblock(self) -> None:
        with self._lock:
            self._blocked = False

    def reopen(self) -> None:
        with self._lock:
            self._closed = False

    def close(self) -> None:
        """Refuse from now on and cut every live socket, so handler threads can be joined."""
        with self._lock:
            self._closed = True
            live = list(self._live)
        for sock in live:
            _reset(sock)


class _Served:
    """What the proxies share: a server run in a daemon thread from ``start()`` to ``stop()``,
    and the switch that cuts its live connections when it stops (or is blocked)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._switch = _Switch()
        self._server: socketserver.TCPServer | None = None
        self._thread: threading.Thread | None = None

    def _serve(self, server: socketserver.TCPServer, name: str) -> None:
        self._switch.reopen()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        self._switch.close()  # wakes handlers idling on keep-alive reads
        server.server_close()
        if thread is not None:
            thread.join()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- TCP


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins the handler threads
    allow_reuse_address = True

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        super().__init__((LOOPBACK, 0), _TcpHandler)


class _TcpHandler(socketserver.BaseRequestHandler):
    server: _TcpServer

    def handle(self) -> None:
        proxy = self.server.proxy
        client: socket.socket = self.request
        if not proxy._switch.admit(client):
            return
        with proxy._lock:
            proxy.connections += 1
        try:
            try:
                upstream = socket.create_connection((proxy.target_host, proxy.target_port),
                                                    timeout=10)
            except OSError:
                _reset(client)
                return
            with upstream:
                upstream.settimeout(None)
                # Forward small request/response packets at once, as a direct connection would.
                for sock in (client, upstream):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                proxy._switch.admit(upstream)
                try:
                    _pump(client, upstream, proxy.delay)
                finally:
                    proxy._switch.release(upstream)
        finally:
            proxy._switch.release(client)


def _pump(a: socket.socket, b: socket.socket, delay: float = 0.0) -> None:
    """Copy bytes both ways until either side closes or errors; what ``a`` sends waits
    ``delay`` seconds a read first."""
    peer = {a: b, b: a}
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ)
        sel.register(b, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = src.recv(65536)
                    if not data:
                        return
                    if delay and src is a:
                        time.sleep(delay)
                    peer[src].sendall(data)
                except OSError:
                    return


class TcpProxy(_Served):
    """Threaded TCP forwarder on ``127.0.0.1:<port>`` to ``target_host:target_port``.

    ``block()`` resets every live connection and every new one until ``unblock()``: to a client
    it looks like the service went down. ``connections`` counts accepted connections. With
    ``delay`` each read from a client waits that many seconds before it goes on: a slow link.
    """

    def __init__(self, target_host: str, target_port: int, delay: float = 0.0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        self.connections = 0
        super().__init__()
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def start(self) -> TcpProxy:
        if self._server is not None:
            return self
        server = _TcpServer(self)
        self.port = server.server_address[1]
        self._serve(server, f"TcpProxy:{self.port}")
        return self

    def block(self) -> None:
        self._switch.block()

    def unblock(self) -> None:
        self._switch.unblock()

    def __enter__(self) -> TcpProxy:
        return self.start()


# --------------------------------------------------------------------------- HTTP


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, proxy: CountingHttpProxy) -> None:
        self.proxy = proxy
        super().__init__((LOOPBACK, 0), _HttpHandler)


class _NoDelayConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HttpHandler(BaseHTTPRequestHandler):
    """One instance per client connection: keeps one upstream connection for keep-alive."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle on, delayed ACKs add ~40 ms each.
    disable_nagle_algorithm = True
    server: _HttpServer

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None
        self._admitted = self.server.proxy._switch.admit(self.connection)
        if not self._admitted:
            self.close_connection = True

    def handle(self) -> None:
        if self._admitted:
            super().handle()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._upstream is not None:
                self._upstream.close()
            self.server.proxy._switch.release(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read counts, not access logs

    def _forward(self) -> None:
        proxy = self.server.proxy
        if proxy._switch.blocked or proxy._refuses(self.path):
            _reset(self.connection)
            self.close_connection = True
            return
        answer = proxy._answer
        if answer is not None:
            status, content_type, body = answer
            proxy._record(self.path)
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        if proxy._prefix:
            if not self.path.startswith(proxy._prefix + "/"):
                self.send_error(404, "not under " + proxy._prefix)
                return
            self.path = self.path[len(proxy._prefix):]
        proxy._record(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Host"] = proxy._netloc
        try:
            response, payload = self._exchange(body, headers)
        except (OSError, http.client.HTTPException):
            self.send_error(502, "upstream unreachable")
            self.close_connection = True
            return
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _exchange(
        self, body: bytes | None, headers: dict[str, str]
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """One request upstream; retried once on a fresh connection if the kept one went stale."""
        proxy = self.server.proxy
        for attempt in range(2):
            if self._upstream is None:
                self._upstream = _NoDelayConnection(proxy._host, proxy._port, timeout=60)
            try:
                self._upstream.request(self.command, proxy._base_path + self.path, body, headers)
                response = self._upstream.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException):
                self._upstream.close()
                self._upstream = None
                if attempt == 1:
                    raise
                continue
            if response.will_close:
                self._upstream.close()
                self._upstream = None
            return response, payload
        raise AssertionError("unreachable")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _forward


class CountingHttpProxy(_Served):
    """HTTP/1.1 forwarder to ``target_base_url`` that counts requests by path prefix.

    Used to count OSRM ``/match`` calls. Keep-alive clients (requests.Session) are served on
    one connection each. While blocked, requests get their connection reset, no response;
    after ``refuse(fragment)``, only the requests whose unquoted path contains ``fragment``.
    With ``prefix`` (``/osrm``) it is a reverse proxy that serves the target under that path:
    the prefix is cut off before forwarding, and a path outside it gets a 404. After
    ``answer(status, ...)`` it answers every request itself, as a misconfigured proxy would
    (a 401 with an empty body, a 414 for a long request line).
    """

    def __init__(self, target_base_url: str, *, prefix: str = "") -> None:
        parts = urlsplit(target_base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected an http:// base URL, got {target_base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._netloc = parts.netloc
        self._base_path = parts.path.rstrip("/")
        self._prefix = prefix.rstrip("/")
        self._counts: Counter[str] = Counter()
        self._refused: str | None = None
        self._answer: tuple[int, str, bytes] | None = None
        super().__init__()
        self.url = ""

    def start(self) -> CountingHttpProxy:
        if self._server is not None:
            return self
        server = _HttpServer(self)
        self.url = f"http://{LOOPBACK}:{server.server_address[1]}"
        self._serve(server, f"CountingHttpProxy:{self.url}")
        return self

    def block(self) -> None:
        self._switch.block()

    def unblock(self) -> None:
        self._switch.unblock()

    def refuse(self, fragment: str) -> None:
        """Reset the requests whose unquoted path contains ``fragment`` (one OSRM trace's
        encoded first point, say) and forward the others: a fault for some batches only."""
        with self._lock:
            self._refused = fragment

    def answer(self, status: int, body: str = "", content_type: str = "text/html") -> None:
        """Answer every request with ``status`` and ``body`` (counted, not forwarded)."""
        self._answer = (status, content_type, body.encode())

    def _refuses(self, raw_path: str) -> bool:
        with self._lock:
            return self._refused is not None and self._refused in unquote(raw_path)

    def count(self, path_prefix: str = "/") -> int:
        """Requests forwarded so far whose path (query string excluded) starts with the prefix."""
        with self._lock:
            return sum(n for path, n in self._counts.items() if path.startswith(path_prefix))

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def _record(self, raw_path: str) -> None:
        path = raw_path.split("?", 1)[0][:_COUNTED_PATH_CHARS]
        with self._lock:
            self._counts[path] += 1

    def __enter__(self) -> CountingHttpProxy:
        return self.start()


# --------------------------------------------------------------------------- forward proxy


class _ForwardServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, proxy: ForwardHttpProxy) -> None:
        self.proxy = proxy
        super().__init__((LOOPBACK, 0), _ForwardHandler)


class _ForwardHandler(BaseHTTPRequestHandler):
    """Absolute-URI requests (``GET http://host:port/path``) go to that host on a connection
    of their own; ``CONNECT host:port`` is tunnelled."""

    protocol_version = "HTTP/1.1"
    server: _ForwardServer

    def setup(self) -> None:
        super().setup()
        self.close_connection = not self.server.proxy._switch.admit(self.connection)

    def handle(self) -> None:
        if not self.close_connection:
            super().handle()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._switch.release(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, code: int, headers: tuple[tuple[str, str], ...] = ()) -> None:
        body = f"<html><body><h1>{code} {self.responses[code][0]}</h1></body></html>".encode()
        self.send_response(code)
        for key, value in (*headers, ("Content-Type", "text/html"),
                           ("Content-Length", str(len(body)))):
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        proxy = self.server.proxy
        if proxy.credentials and self.headers.get("Proxy-Authorization") != (
                f"Basic {proxy.credentials}"):
            with proxy._lock:
                proxy.refused += 1
            self._reply(407, (("Proxy-Authenticate", 'Basic realm="proxy"'),))
            return
        if proxy.status:
            self._reply(proxy.status)
            return
        if self.command == "CONNECT":
            host, _, port = self.path.rpartition(":")
            try:
                upstream = socket.create_connection((host, int(port)), timeout=10)
            except (OSError, ValueError):
                self._reply(502)
                return
            with proxy._lock:
                proxy.forwarded.append(self.path)
            self.send_response(200, "Connection established")
            self.end_headers()
            with upstream:
                _pump(self.connection, upstream)
            self.close_connection = True
            return
        target = urlsplit(self.path)
        if target.scheme != "http" or not target.hostname:
            self._reply(400)  # not an absolute URI: a client that takes us for the server
            return
        with proxy._lock:
            proxy.forwarded.append(self.path)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream_conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
        try:
            upstream_conn.request(self.command, urlunsplit(("", "", target.path or "/",
                                                            target.query, "")), None, headers)
            response = upstream_conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            self._reply(502)
            return
        finally:
            upstream_conn.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_HEAD = do_CONNECT = _forward


class ForwardHttpProxy(_Served):
    """A forward HTTP proxy on ``127.0.0.1``, as ``HTTP_PROXY`` names one: it forwards
    absolute-URI requests and tunnels ``CONNECT``, and ``forwarded`` lists the targets it
    passed on. With ``username``/``password`` a request without that ``Proxy-Authorization``
    gets 407 (counted in ``refused``); ``status`` (502, 503) answers every request with it.
    """

    def __init__(self, *, username: str | None = None, password: str | None = None) -> None:
        self.credentials = base64.b64encode(f"{username}:{password}".encode()).decode() if (
            username is not None) else None
        self.forwarded: list[str] = []
        self.refused = 0
        self.status = 0
        super().__init__()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> ForwardHttpProxy:
        server = _ForwardServer(self)
        self.port = server.server_address[1]
        self._serve(server, f"ForwardHttpProxy:{self.port}")
        return self

    def __enter__(self) -> ForwardHttpProxy:
        return self.start()
