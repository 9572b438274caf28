"""A TCP proxy for tests that can leave its connections half-open, as a firewall does.

A firewall or NAT that forgets an idle connection drops its packets from then on without
telling either end: the client's connection stays open, what it sends is never answered,
and nothing closes it. `TcpProxy.black_hole` does that to every connection through the
proxy, and to those made while it lasts; `TcpProxy.forward` makes new connections work
again, while those cut off stay cut off (a half-open connection never recovers).
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support import free_port

_CHUNK = 65536


class _Pair:
    """A client's connection and the proxy's to the server, pumped both ways."""

    def __init__(self, client: socket.socket, server: socket.socket | None) -> None:
        self.client = client
        self.server = server
        self.cut_off = server is None

    def close(self) -> None:
        for sock in (self.client, self.server):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


class TcpProxy:
    """Forwards a free loopback port to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._forwarding = True
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def black_hole(self) -> None:
        """From now on forward nothing, close nothing: every connection is half-open."""
        with self._lock:
            self._forwarding = False
            for pair in self._pairs:
                pair.cut_off = True

    def forward(self) -> None:
        """Connections made from now on are forwarded again."""
        with self._lock:
            self._forwarding = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pairs, self._pairs = self._pairs, []
        with contextlib.suppress(OSError):
            self._listener.close()
        for pair in pairs:
            pair.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                forwarding = self._forwarding
            server = None
            if forwarding:
                try:
                    server = socket.create_connection(self.upstream, timeout=5)
                    server.settimeout(None)
                except OSError:
                    client.close()
                    continue
            pair = _Pair(client, server)
            with self._lock:
                if self._closed:
                    pair.close()
                    return
                self._pairs.append(pair)
            self._pump(pair, client, server)
            if server is not None:
                self._pump(pair, server, client)

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket | None) -> None:
        def run() -> None:
            while True:
                try:
                    data = source.recv(_CHUNK)
                except OSError:
                    data = b""
                if not data:  # an end closed its connection: so does the proxy
                    pair.close()
                    return
                if pair.cut_off or sink is None:
                    continue  # swallowed: neither answered nor refused
                try:
                    sink.sendall(data)
                except OSError:
                    pair.close()
                    return

        threading.Thread(target=run, name="proxy-pump", daemon=True).start()
