"""The Storage SCU: sends our SR and SC objects to a DICOM node."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from dicom_io.scp import VERIFICATION_SOP_CLASS

logger = logging.getLogger(__name__)


class SendError(RuntimeError):
    """The destination could not be reached or refused the object."""


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int  # DICOM status from the peer; 0x0000 success, 0xB000.. warnings

    @property
    def ok(self) -> bool:
        # Warnings (0xB000, 0xB006, 0xB007) mean the peer stored the object.
        return self.status == 0x0000 or (self.status & 0xF000) == 0xB000


def echo(
    ae_title: str,
    host: str,
    port: int,
    *,
    calling_ae_title: str,
    timeout: float = 10,
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    """C-ECHO a node (over TLS with ``ssl_context``); True when it answered Success."""
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    tls = (ssl_context, host) if ssl_context is not None else None
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


def send_files(
    paths: Sequence[Path],
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str,
    timeout: float = 30,
    ssl_context: ssl.SSLContext | None = None,
) -> list[SendOutcome]:
    """Send DICOM files over one association.

    Parameters
    ----------
    paths
        Part 10 files; each is offered in its own SOP class and transfer syntax.
    ae_title, host, port
        The destination.
    calling_ae_title
        Our AE title as the destination knows it.

    Returns
    -------
    list of SendOutcome
        One per file, in order.

    Raises
    ------
    SendError
        When no association could be made, or it broke before every file was sent.
    """
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    for syntax_pair in sorted(
        {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}
    ):
        ae.add_requested_context(syntax_pair[0], [syntax_pair[1]])
    tls = (ssl_context, host) if ssl_context is not None else None
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise SendError(f"association with {ae_title}@{host}:{port} failed: {reason}")
    outcomes: list[SendOutcome] = []
    try:
        for path, ds in zip(paths, datasets, strict=True):
            status = assoc.send_c_store(ds)
            if not status or "Status" not in status:
                raise SendError(f"{ae_title}@{host}:{port} did not answer a C-STORE")
            outcomes.append(SendOutcome(Path(path), int(status.Status)))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes
