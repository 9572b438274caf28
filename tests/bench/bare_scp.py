"""The peer for the ingest benchmark: a pynetdicom SCP that only writes, fsyncs, renames.

Usage: python bare_scp.py PORT FOLDER
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE

from dicom_io.scp import TRANSFER_SYNTAXES, image_storage_sop_classes


def main() -> None:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    incoming = folder / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(incoming)  # same file system: the final step is a rename

    def on_store(event: evt.Event) -> int:
        assert isinstance(event.request, C_STORE)
        temp = Path(event.dataset_path)
        fd = os.open(temp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.replace(temp, folder / f"{event.request.AffectedSOPInstanceUID}.dcm")
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    for uid in image_storage_sop_classes():
        ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
