"""Nobody let in: TLS on the listener and on deliveries, AE titles, destinations, file modes.

Certificates are made in the test with the ``openssl`` command line (a private CA, a
certificate for our node and the storescp, one for the PACS as a client).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_io.scu import SendError, send_files
from tests.conftest import StoreSCP
from tests.integration.test_end_to_end import Node, base_env, cli
from tests.integration.test_reliability import everything_delivered, make_hands
from tests.support import dcmtk_tool, free_port, storescu_command, wait_for, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Certificates:
    """A private CA with a node certificate (localhost, 127.0.0.1) and a client certificate."""

    def __init__(self, folder: Path) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.fail("the openssl command line is not installed")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._openssl = openssl
        self.ca = folder / "ca.pem"
        self._run(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=boneage test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        self.node = self._issue("node", "localhost", "DNS:localhost,IP:127.0.0.1")
        self.client = self._issue("client", "PACS", "DNS:pacs.invalid")

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [self._openssl, *args], cwd=self.folder, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr

    def _issue(self, name: str, common_name: str, alt_names: str) -> tuple[Path, Path]:
        """(certificate, key) signed by the CA, for server and client use."""
        (self.folder / f"{name}.ext").write_text(
            f"subjectAltName={alt_names}\n"
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        self._run(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={common_name}",
        )  # fmt: skip
        self._run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
            "-extfile", f"{name}.ext",
        )  # fmt: skip
        return self.folder / f"{name}.pem", self.folder / f"{name}.key"

    def client_context(self, *, with_certificate: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        if with_certificate:
            context.load_cert_chain(*self.client)
        return context


class TLSStoreSCP(StoreSCP):
    """dcmtk's storescp serving TLS only, requiring a client certificate from the CA."""

    def __init__(self, folder: Path, certificates: Certificates) -> None:
        super().__init__(folder)
        self.certificates = certificates

    def start(self) -> TLSStoreSCP:
        certificate, key = self.certificates.node
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                dcmtk_tool("storescp"),
                "+tls",
                str(key),
                str(certificate),
                "+cf",
                str(self.certificates.ca),
                "--require-peer-cert",
                "--aetitle",
                self.ae_title,
                "--output-directory",
                str(self.folder),
                "--accept-all",
                str(self.port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_port(self.port, timeout=20, process=self.process)
        return self


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.stop()


def store(
    port: int,
    path: Path,
    *,
    called: str = "BONEAGE",
    calling: str = "PACS",
    tls: ssl.SSLContext | None = None,
) -> int:
    [outcome] = send_files(
        [path],
        ae_title=called,
        host="127.0.0.1",
        port=port,
        calling_ae_title=calling,
        timeout=20,
        ssl_context=tls,
    )
    return outcome.status


def storescu_over_tls(
    certificates: Certificates, port: int, *files: Path
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu sends ``files`` to the listener on ``port`` over TLS, as PACS,
    with the client certificate and trusting the test CA."""
    client_certificate, client_key = certificates.client
    return subprocess.run(
        storescu_command(
            port,
            *files,
            extra=("+tls", str(client_key), str(client_certificate), "+cf", str(certificates.ca)),
        ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tls_listener_and_tls_deliveries(
    tmp_path: Path, tiny_checkpoint: Path, nodes: list[Node]
) -> None:
    certificates = Certificates(tmp_path / "pki")
    pacs = TLSStoreSCP(tmp_path / "pacs", certificates).start()
    port = free_port()
    env = base_env(tmp_path, pacs, tiny_checkpoint, port)
    node_certificate, node_key = certificates.node
    env.update(
        BONEAGE_TLS_CERTIFICATE=str(node_certificate),
        BONEAGE_TLS_PRIVATE_KEY=str(node_key),
        BONEAGE_TLS_CA_CERTIFICATES=str(certificates.ca),
        BONEAGE_TLS_REQUIRE_CLIENT_CERTIFICATE="true",
        BONEAGE_DESTINATIONS_TLS="true",
        BONEAGE_LOG_LEVEL="INFO",
    )
    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    node = Node(tmp_path, env)
    nodes.append(node)
    try:
        serve = node.start("serve", "serve")
        wait_for_port(port, timeout=120, process=serve)
        first, second = make_hands(tmp_path, env, 2)

        # An idle TCP connection must not stall the listener's TLS handshakes for ever.
        with socket.create_connection(("127.0.0.1", port)):
            tls_ok = certificates.client_context(with_certificate=True)
            assert store(port, first, tls=tls_ok) == 0x0000
        with pytest.raises(SendError):
            store(port, first)  # plain TCP
        no_certificate = certificates.client_context(with_certificate=False)
        with pytest.raises(SendError):
            store(port, first, tls=no_certificate)

        dcmtk = storescu_over_tls(certificates, port, second)
        assert dcmtk.returncode == 0, dcmtk.stderr

        # The administrator's tools speak TLS too (the node's own certificate as client).
        target = f"BONEAGE@127.0.0.1:{port}"
        echoed = cli("echo", target, "--calling-ae", "PACS", env=env)
        assert echoed.returncode == 0, echoed.stdout + echoed.stderr
        assert "C-ECHO succeeded" in echoed.stdout
        plain = cli("echo", target, "--calling-ae", "PACS", "--no-tls", env=env)
        assert plain.returncode == 1 and "no C-ECHO answer" in plain.stdout
        sent = cli("send", str(second), "--to", target, "--calling-ae", "PACS", "--tls", env=env)
        assert sent.returncode == 0 and "0x0000" in sent.stdout, sent.stderr
        broken = {**env, "BONEAGE_TLS_CA_CERTIFICATES": str(tmp_path / "missing-ca.pem")}
        unusable = cli("echo", target, "--tls", env=broken)
        assert unusable.returncode == 1 and "TLS settings unusable" in unusable.stderr

        # Both studies' SR and SC reach the TLS-only storescp, which demands our certificate.
        pacs.wait_for_objects(4, timeout=240)
        wait_for(
            lambda: everything_delivered(database_url, 2), timeout=60, what="deliveries recorded"
        )
    finally:
        pacs.stop()
    assert "(TLS)" in node.log_text()


def test_only_our_ae_only_our_destinations_private_files(
    tmp_path: Path, storescp: StoreSCP, tiny_checkpoint: Path, nodes: list[Node]
) -> None:
    # The PACS that sends to us also runs an SCP, but it is not a destination.
    caller = StoreSCP(tmp_path / "caller", ae_title="PACS").start()
    port = free_port()
    env = base_env(tmp_path, storescp, tiny_checkpoint, port)
    env.update(BONEAGE_LOG_LEVEL="INFO")
    data = tmp_path / "data"
    node = Node(tmp_path, env)
    nodes.append(node)
    try:
        serve = node.start("serve", "serve")
        wait_for_port(port, timeout=120, process=serve)
        [hand] = make_hands(tmp_path, env, 1)
        with pytest.raises(SendError, match="rejected"):
            store(port, hand, called="NOTBONEAGE")
        with pytest.raises(SendError, match="rejected"):
            store(port, hand, calling="INTRUDER")
        assert store(port, hand) == 0x0000

        storescp.wait_for_objects(2, timeout=240)
        database_url = f"sqlite:///{data / 'boneage.db'}"
        wait_for(
            lambda: everything_delivered(database_url, 1), timeout=60, what="deliveries recorded"
        )
        assert caller.received() == []
    finally:
        caller.stop()

    private = [
        *(p for p in (data / "spool").rglob("*") if p.is_file()),
        *(p for p in (data / "outbox").rglob("*") if p.is_file()),
        *data.glob("boneage.db*"),
    ]
    assert len([p for p in private if p.suffix == ".dcm"]) == 3  # the image, its SR and SC
    loose = {str(p.relative_to(data)): oct(p.stat().st_mode & 0o777) for p in private}
    assert {k: v for k, v in loose.items() if int(v, 8) & 0o077} == {}
    for folder in (data, data / "spool", data / "outbox"):
        assert folder.stat().st_mode & 0o077 == 0, folder
