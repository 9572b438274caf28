"""TLS contexts for DICOM over TLS (PS3.15 Annex B), built from the settings in one place.

The listener serves TLS when ``BONEAGE_TLS_CERTIFICATE`` and ``BONEAGE_TLS_PRIVATE_KEY``
are set; deliveries use TLS when ``BONEAGE_DESTINATIONS_TLS`` is true. Both verify
peers against ``BONEAGE_TLS_CA_CERTIFICATES`` (the system store when unset, for
destinations) and accept nothing older than TLS 1.2 (BCP 195).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl

from worker.settings import Settings

logger = logging.getLogger(__name__)

#: How long a client may take to complete the TLS handshake with the listener.
HANDSHAKE_TIMEOUT_SECONDS = 10.0


class _ServerSocket(ssl.SSLSocket):
    """A listener's TLS connection, whose handshake is bounded by `HANDSHAKE_TIMEOUT_SECONDS`.

    The bound is on the whole handshake (CPython counts down one deadline across its
    reads and writes), so a client sending a byte now and then cannot stretch it.
    """

    def do_handshake(self, block: bool = False) -> None:
        previous = self.gettimeout()
        self.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
        try:
            super().do_handshake(block)
        finally:
            # blocking again (or as the caller had it) for whoever reads next
            with contextlib.suppress(OSError):  # closed meanwhile
                self.settimeout(previous)


class _ServerContext(ssl.SSLContext):
    """An SSLContext whose sockets leave their handshake to the connection's own thread.

    pynetdicom wraps each accepted socket in its one accept loop: a handshake there
    made every client wait for the slowest, and an idle TCP connection to the TLS
    port (a port scanner, a load-balancer probe) held all of them for the whole
    handshake timeout. The socket is only wrapped there; the listener's request
    handler (`dicom_io.scp`) completes the handshake, bounded, before it reads a PDU.
    """

    sslsocket_class = _ServerSocket

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's context, or None when the listener serves plain TCP.

    Raises
    ------
    OSError, ssl.SSLError
        When a certificate, key or CA file cannot be read or does not match.
    """
    if settings.tls_certificate is None or settings.tls_private_key is None:
        return None
    context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_certificates is not None:
        context.load_verify_locations(cafile=settings.tls_ca_certificates)
        # With a CA but no requirement, a certificate a client offers is still checked.
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.tls_require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


def client_context(settings: Settings, *, enabled: bool | None = None) -> ssl.SSLContext | None:
    """The context for deliveries, or None when destinations are plain TCP.

    The destination's certificate must chain to the CA file and name the host of
    the destination; our own certificate is presented when one is configured.
    ``enabled`` overrides ``BONEAGE_DESTINATIONS_TLS`` (``send --tls``, ``echo --tls``).
    """
    if not (settings.destinations_tls if enabled is None else enabled):
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(settings.tls_ca_certificates) if settings.tls_ca_certificates else None,
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_certificate is not None and settings.tls_private_key is not None:
        context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    return context
