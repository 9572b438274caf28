"""A TCP proxy for tests that can leave its connections half-open, as a firewall does.

A firewall or NAT that forgets an idle connection drops its packets from then on without
telling either end: the client's connection stays open, what it sends is never answered,
and nothing closes it. `TcpProxy.black_hole` does that to every connection through the
proxy, and to those made while it lasts; `TcpProxy.forward` makes new connections work
again, while those cut off stay cut off (a half-open connection never recovers).

`SlowLink` carries what a client sends at a set rate, as a slow WAN link does, or stops
reading it, as a peer that stopped reading does.
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


class SlowLink:
    """Forwards a free loopback port to ``127.0.0.1:upstream_port``, what the client sends
    at ``rate`` bytes a second (a slow WAN link; the answers at full speed), or, after
    `stop_reading`, not at all: the proxy then reads nothing more from the client, whose
    sends stall with the receive window closed, as against a peer that stopped reading.

    The proxy's receive buffer is kept small, so that the client's kernel, not the
    proxy's, holds what the link has not carried yet.
    """

    _TICK = 0.05  # seconds between the link's slices of ``rate``

    def __init__(self, upstream_port: int, rate: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.rate = rate
        self.forwarded = 0  # bytes of the client's carried to the server
        self._reading = threading.Event()
        self._reading.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(5)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="slow-link-accept", daemon=True).start()

    def stop_reading(self) -> None:
        self._reading.clear()

    def close(self) -> None:
        self._closed.set()
        self._reading.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:  # closed
                return
            server.settimeout(None)
            self._sockets += [client, server]
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket) -> None:
        slice_ = max(1, int(self.rate * self._TICK))
        while not self._closed.is_set():
            self._reading.wait()
            try:
                data = client.recv(slice_)
                if not data:
                    break
                server.sendall(data)
            except OSError:
                break
            self.forwarded += len(data)
            # the link's pace: a slice every tick (the model of a slow link, no waiting
            # for a condition)
            self._closed.wait(self._TICK)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        while True:
            try:
                data = server.recv(65536)
                if not data:
                    break
                client.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
