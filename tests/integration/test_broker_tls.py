"""A broker over TLS is checked as the DICOM peers are: its certificate's chain and name.

kombu connects to a ``rediss`` URL that says nothing more with no check at all (it logs
one warning): anyone on the path could pose as Redis and take its password and every
message. A real redis-server of the test's own serves TLS with a certificate of a
private CA (``openssl``, as in test_security.py).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_security import Certificates
from tests.support import free_port, own_redis_server
from worker.celery_app import app, broker_tls, configure
from worker.settings import load_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Path]]:
    """The TLS port of a redis-server of this test's own, and its CA's certificate."""
    certificates = Certificates(tmp_path / "pki")
    certificate, key = certificates.node  # localhost, 127.0.0.1
    port = free_port()
    options = [
        "--port", "0", "--tls-port", str(port), "--dir", str(tmp_path),
        "--tls-cert-file", str(certificate), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(certificates.ca), "--tls-auth-clients", "no",
    ]  # fmt: skip
    with own_redis_server(port, options, monkeypatch):
        yield port, certificates.ca


def _connects(tmp_path: Path, broker_url: str) -> BaseException | None:
    """What connecting the app to ``broker_url`` raised; None where it connected."""
    configure(load_settings(data_dir=tmp_path / "data", broker_url=broker_url))
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=10)
            connection.default_channel.client.ping()
    except Exception as exc:
        return exc
    return None


def _certificate_refused(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def test_a_rediss_broker_whose_certificate_is_not_trusted_is_refused(
    tmp_path: Path, tls_redis: tuple[int, Path]
) -> None:
    """Its CA is not among the system's: refused, where it was taken unchecked; with the
    CA named in the URL, taken."""
    port, ca = tls_redis
    refused = _connects(tmp_path, f"rediss://127.0.0.1:{port}/0")
    assert _certificate_refused(refused), repr(refused)
    trusted = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    assert _connects(tmp_path, trusted) is None


def test_the_tls_options_of_each_broker() -> None:
    """rediss: the certificate checked unless the URL says how; amqps: its name too (py-amqp
    checked the chain alone); no TLS: kombu's."""
    assert broker_tls("rediss://:secret@redis.example:6380/0") == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED
    }
    assert broker_tls("rediss://redis.example:6380/0?ssl_cert_reqs=none") is None
    assert broker_tls("amqps://u:p@rabbit.example:5671/boneage") == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": "rabbit.example",
    }
    # a list to fail over to: kombu gives each broker the one dict, and a name pinned
    # there would check the second's certificate against the first's name
    assert broker_tls("amqps://u:p@a.example:5671/v;amqps://u:p@b.example:5671/v") == {
        "cert_reqs": ssl.CERT_REQUIRED
    }
    assert broker_tls("redis://127.0.0.1:6379/0") is None
    assert broker_tls("amqp://guest:guest@127.0.0.1:5672/boneage") is None
