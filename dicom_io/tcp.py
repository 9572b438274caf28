"""TCP options for DICOM associations: no request or response waits on a timer.

DICOM is a request/response protocol, and several implementations write one PDU in
pieces (dcmtk's ``storescp`` writes a C-STORE response as a 12-byte PDU header and
then its body). With Nagle's algorithm on, the sender holds the second piece until
the first is acknowledged; the receiver, waiting for the rest of the message, delays
that acknowledgement by up to 40 ms (Linux). Every C-STORE then costs about 40 ms of
nothing per direction: 90 ms for an SR that takes under 10 ms to send.

Our side of every association therefore

- sends at once (``TCP_NODELAY``): our own small PDUs never wait, and
- acknowledges at once whenever it has sent something and waits for an answer
  (``TCP_QUICKACK``, Linux; the kernel leaves quick-ack mode again by itself, so it is
  re-armed after each send), so that a peer's held-back piece goes out immediately.

Re-arming after a send was not always enough: after a large object (the 1.1 MB heat-map
SC) the first piece of ``storescp``'s answer still waited for Linux's delayed
acknowledgement in 9 of 30 deliveries, and in 26 of 30 when ``storescp`` took 128 KiB
PDUs (the kernel's ``DelayedACKs`` counter rose by exactly as many). A socket of ours
that reads through pynetdicom's ``recv`` (every association we request) therefore also
sets ``TCP_QUICKACK`` before each read (:class:`QuickAckSocket`). Linux sends an
acknowledgement it is holding back when the option is set, so what has arrived is
acknowledged as soon as we look for it, and the peer's second piece follows at once.
The listener's own socket reads differently (``dicom_io.scp``) and is left as it is.

Bulk transfer is unaffected: full segments are neither held nor waited for.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket

logger = logging.getLogger(__name__)

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _raw_socket(event: evt.Event) -> socket.socket | None:
    transport = event.assoc.dul.socket
    return transport.socket if transport is not None else None


def _send_at_once(event: evt.Event) -> None:
    sock = _raw_socket(event)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not TCP, or already closed: nothing to tune
        logger.debug("TCP_NODELAY not set: %s", exc)


def _acknowledge_at_once(event: evt.Event) -> None:
    sock = _raw_socket(event)
    if sock is not None:
        _quick_ack(sock)


def _quick_ack(sock: socket.socket) -> None:
    if _QUICKACK is not None:
        with contextlib.suppress(OSError):  # the peer closed as we sent
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


class QuickAckSocket(AssociationSocket):
    """pynetdicom's association socket, acknowledging what has come before each read."""

    def recv(self, nr_bytes: int) -> bytearray:
        if self.socket is not None:
            _quick_ack(self.socket)
        return super().recv(nr_bytes)


def _acknowledge_before_reading(event: evt.Event) -> None:
    # Once connected and before anything is read (the DUL's thread does both); only
    # pynetdicom's own socket class, never one of ours that reads another way
    transport = event.assoc.dul.socket
    if _QUICKACK is not None and type(transport) is AssociationSocket:
        transport.__class__ = QuickAckSocket


#: pynetdicom event handlers that apply the options above to an association; pass
#: them in ``evt_handlers`` of ``AE.associate`` or of the server.
LOW_LATENCY_HANDLERS: list[tuple[evt.EventType, Callable[[evt.Event], None]]] = [
    (evt.EVT_CONN_OPEN, _send_at_once),
    (evt.EVT_CONN_OPEN, _acknowledge_before_reading),
    (evt.EVT_DATA_SENT, _acknowledge_at_once),
]
