"""The listener's PDU reader (few large reads) and the writeback it starts while a data
set comes."""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from dicom_io.scp import _load_sync_file_range, _StreamingSocket


def _reader(sock: socket.socket) -> _StreamingSocket:
    reader = _StreamingSocket.__new__(_StreamingSocket)  # no association needed to read
    reader.socket = sock
    return reader


def test_reads_exactly_the_bytes_asked_for_across_many_sends() -> None:
    ours, peer = socket.socketpair()
    payload = os.urandom(3 * 1024 * 1024 + 17)

    def send_in_pieces() -> None:
        for i in range(0, len(payload), 65_000):
            peer.sendall(payload[i : i + 65_000])

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    head, rest = bytearray(6), bytearray(len(payload) - 6)  # as the DUL reads a PDU
    try:
        reader = _reader(ours)
        with memoryview(head) as view:
            assert reader.read_into(view) == 6
        with memoryview(rest) as view:
            assert reader.read_into(view) == len(rest)
    finally:
        sender.join()
        ours.close()
        peer.close()
    assert isinstance(rest, bytearray)
    assert bytes(head + rest) == payload


def test_returns_what_arrived_when_the_peer_closes() -> None:
    ours, peer = socket.socketpair()
    peer.sendall(b"partial")
    peer.close()
    buffer = bytearray(1000)
    try:
        with memoryview(buffer) as view:
            count = _reader(ours).read_into(view)
    finally:
        ours.close()
    assert buffer[:count] == bytearray(b"partial")


def test_read_into_fills_the_view_or_says_how_much_came() -> None:
    ours, peer = socket.socketpair()
    peer.sendall(b"0123456789")
    peer.close()
    buffer = bytearray(16)
    try:
        with memoryview(buffer) as view:
            assert _reader(ours).read_into(view[2:6]) == 4
            assert _reader(ours).read_into(view[6:]) == 6  # then the peer closed
    finally:
        ours.close()
    assert bytes(buffer) == b"\0\0" + b"0123456789" + b"\0" * 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_is_started_on_linux_and_a_bad_file_is_an_oserror(tmp_path: Path) -> None:
    start = _load_sync_file_range()
    assert start is not None
    path = tmp_path / "data"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, os.urandom(3 << 20))
        start(fd, 0)  # returns without waiting for the disk
        start(fd, 1 << 20)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as raised:
        start(fd, 0)  # closed
    assert raised.value.errno == errno.EBADF


def test_a_thread_waits_on_sockets_numbered_past_select_s_limit() -> None:
    """A listener with many associations and files open holds descriptors past 1023,
    which ``select`` refuses; an association's DUL thread then spun instead of waiting."""
    resource = pytest.importorskip("resource")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1100:
        pytest.skip(f"this process may open only {soft} files")
    from dicom_io.scp import _wait_readable

    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1030)]
    try:
        quiet, woken = socket.socketpair(), socket.socketpair()
        high = [quiet[0].fileno(), woken[0].fileno()]
        assert min(high) > 1023
        assert _wait_readable(high, 0.01) == set()
        woken[1].send(b"\0")
        assert _wait_readable(high, 10) == {woken[0].fileno()}
        for pair in (quiet, woken):
            for end in pair:
                end.close()
    finally:
        for descriptor in filler:
            os.close(descriptor)


def test_a_deadline_bounds_the_whole_read_and_the_socket_keeps_its_timeout() -> None:
    import time

    ours, peer = socket.socketpair()
    ours.settimeout(30)
    peer.sendall(b"abc")  # three of the ten bytes asked for, then nothing
    buffer = bytearray(10)
    try:
        started = time.monotonic()
        with memoryview(buffer) as view, pytest.raises(TimeoutError):
            _reader(ours).read_into(view, time.monotonic() + 0.3)
        assert time.monotonic() - started < 5  # not the socket's 30 s
        assert ours.gettimeout() == 30
    finally:
        ours.close()
        peer.close()
    assert buffer[:3] == bytearray(b"abc")
