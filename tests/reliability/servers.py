"""A real local ``mlflow server`` (127.0.0.1 only), and what tests put in front of it.

- :class:`MlflowServer`: the server on a SQLite store; one per test worker is shared by the
  tests that do not need their own store (``mlflow_server`` in ``conftest.py``);
- :class:`PortGate`: a port that forwards to that server while it is up, and refuses
  connections (and drops those open) while it is down: a server that goes down and comes
  back, without the 10 to 20 s of a real server's start each time;
- :class:`FaultProxy`: an HTTP proxy that stalls or fails chosen requests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.mlflow_store import mlflow_store

MLFLOW_BIN = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    """A TCP port nothing listens on at the moment (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a SQLite store in ``folder``; :meth:`stop` and :meth:`start` at will."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store_uri(self) -> str:
        """The server's own SQLite store, for reading back what reached it: the same rows the
        server answers with, without one HTTP round trip per key (50 ms each here, 9 s for the
        174 histories of one outage test)."""
        return f"sqlite:///{self.folder / 'mlflow.db'}"

    def start(self, timeout: float = 90.0) -> None:
        if not (self.folder / "mlflow.db").exists():
            mlflow_store(self.folder)  # the server's first start would migrate a new store: 4 s in a cold process
        cmd = [
            str(MLFLOW_BIN), "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        # no job runner (MLflow's GenAI jobs, a third process importing all of MLflow): nothing here uses it
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("mlflow server did not come up in time")

    def stop(self) -> None:
        """Stop the server and every process it started (its own session)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.proc = None
        # the port is closed once nothing accepts connections on it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)


class PortGate:
    """A TCP port on 127.0.0.1 that relays to ``upstream`` (a server's URI) while it is up.

    Down (before :meth:`start`, after :meth:`stop`), nothing listens on the port: a client's
    connection is refused, and connections open when it went down are closed, as when the
    server process dies. Up again on the same port, the same store answers.
    """

    def __init__(self, upstream: str, port: int | None = None) -> None:
        import urllib.parse

        split = urllib.parse.urlsplit(upstream)
        self.upstream = (split.hostname, split.port)
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen on the port again (connections go through from now on)."""
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="port-gate", daemon=True).start()

    def stop(self) -> None:
        """Stop listening and close every connection open through the gate."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() waiting on it
        listener.close()
        with self._lock:
            open_now, self._open = list(self._open), set()
        for sock in open_now:
            _close(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    _close(client), _close(upstream)
                    return
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {src, dst}
            _close(src), _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that injects faults on demand.

    ``mode`` picks what happens to a request whose path contains ``match`` (all when ``""``),
    for the next ``remaining`` such requests (``None``: all of them):

    - ``"pass"``: forwarded as it is;
    - ``"stall"``: held, unanswered, until :meth:`release` (or ``stall_max`` seconds), then forwarded;
    - ``"503"``: answered 503 without reaching the server;
    - ``"500_after_apply"``: forwarded (the server applies it), then answered 500.

    ``hits`` counts the requests a fault was applied to; ``seen`` lists every path.
    """

    def __init__(self, upstream: str, stall_max: float = 120.0) -> None:
        import http.server
        import threading
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self.stall_max = stall_max
        self.mode, self.match, self.remaining = "pass", "", None
        self.hits = 0
        self.seen: list[str] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: nothing kept between faults

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._take(self.path)
                if fault == "503":
                    return self._answer(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected 503"}')
                if fault == "stall":
                    proxy._released.wait(proxy.stall_max)
                status, payload, ctype = proxy._forward(self.command, self.path, dict(self.headers), body)
                if fault == "500_after_apply":
                    return self._answer(500, b'{"error_code": "INTERNAL_ERROR", "message": "injected 500 after apply"}')
                return self._answer(status, payload, ctype)

            def _answer(self, status, payload, ctype="application/json"):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up on a stalled request
                    pass

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _any

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str, match: str = "", remaining: int | None = None) -> None:
        """Apply ``mode`` to the next ``remaining`` requests whose path contains ``match``."""
        with self._lock:
            if mode == "stall":
                self._released.clear()
            self.mode, self.match, self.remaining = mode, match, remaining

    def release(self) -> None:
        """Stop faulting; stalled requests go through now."""
        self.set("pass")
        self._released.set()

    def _take(self, path: str) -> str:
        with self._lock:
            self.seen.append(path)
            if self.mode == "pass" or self.match not in path or self.remaining == 0:
                return "pass"
            if self.remaining is not None:
                self.remaining -= 1
            self.hits += 1
            return self.mode

    def _forward(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, bytes, str]:
        import http.client

        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection", "keep-alive")}
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.getheader("Content-Type") or "application/json"
        finally:
            conn.close()

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
