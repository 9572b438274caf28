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

Bulk transfer is unaffected: full segments are neither held nor waited for.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable

from pynetdicom import evt

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
    if sock is None or _QUICKACK is None:
        return
    with contextlib.suppress(OSError):  # the peer closed as we sent
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


#: pynetdicom event handlers that apply the options above to an association; pass
#: them in ``evt_handlers`` of ``AE.associate`` or of the server.
LOW_LATENCY_HANDLERS: list[tuple[evt.EventType, Callable[[evt.Event], None]]] = [
    (evt.EVT_CONN_OPEN, _send_at_once),
    (evt.EVT_DATA_SENT, _acknowledge_at_once),
]
