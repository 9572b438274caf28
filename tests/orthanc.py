"""A real Orthanc for integration tests: the shipped configuration on free ports.

:class:`OrthancServer` starts the Debian ``Orthanc`` binary as an ordinary process
with ``deploy/orthanc/orthanc.json`` (ports, folders, users and the BONEAGE
modality replaced for the test) and the unmodified ``deploy/orthanc/autoforward.lua``,
and talks to its REST API with the standard library only.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, wait_for

__all__ = ["DEPLOY_DIR", "OrthancServer", "require_orthanc"]

#: The configuration an administrator adapts; the tests run it, not a copy of it.
DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "orthanc"

_LOG_TAIL_CHARS = 6000


def require_orthanc() -> str:
    """Path of the ``Orthanc`` binary (Debian installs it in /usr/sbin), or fail."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    path = shutil.which("Orthanc", path=search)
    if path is None:
        pytest.fail("Orthanc is not installed: run scripts/setup.sh (it installs orthanc)")
    return path


class OrthancServer:
    """One Orthanc process with its own storage, ports and log under ``folder``.

    Parameters
    ----------
    folder
        Holds the generated configuration, the storage and ``orthanc.log``.
    boneage
        ``(ae_title, host, port)`` of boneage-worker, written into the BONEAGE
        modality of the configuration.
    ae_title
        Orthanc's own AE title (``DicomAet``).
    """

    def __init__(
        self, folder: Path, *, boneage: tuple[str, str, int], ae_title: str = "ORTHANC"
    ) -> None:
        self.folder = folder
        self.boneage = boneage
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.user = "boneage-test"
        self.password = secrets.token_urlsafe(16)
        self.log_path = folder / "orthanc.log"
        self.config_path = folder / "orthanc.json"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> str:
        """Orthanc as boneage-worker names a destination: ``AE@host:port``."""
        return f"{self.ae_title}@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict[str, Any]:
        """The shipped configuration with this test's ports, folders and peers."""
        config: dict[str, Any] = json.loads((DEPLOY_DIR / "orthanc.json").read_text())
        ae, host, port = self.boneage
        modality = dict(config["DicomModalities"]["BONEAGE"])
        modality.update(AET=ae, Host=host, Port=port)
        config.update(
            Name=f"boneage-test-{self.http_port}",
            StorageDirectory=str(self.folder / "storage"),
            IndexDirectory=str(self.folder / "storage"),
            LuaScripts=[str(DEPLOY_DIR / "autoforward.lua")],
            Plugins=[],
            HttpPort=self.http_port,
            DicomPort=self.dicom_port,
            DicomAet=self.ae_title,
            RegisteredUsers={self.user: self.password},
            DicomModalities={"BONEAGE": modality},
            SaveJobs=False,
        )
        return config

    def start(self, *, timeout: float = 60) -> OrthancServer:
        """Start Orthanc and wait until its REST API answers ``/system``."""
        binary = require_orthanc()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, str(self.config_path)],
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready() -> dict[str, Any] | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"Orthanc exited with {self.process.returncode} at start-up\n{self.log_tail()}"
                )
            try:
                system = self.get("/system")
            except (OSError, urllib.error.URLError):
                return None
            return system if isinstance(system, dict) else None

        try:
            system = wait_for(ready, timeout=timeout, what="Orthanc's REST API (/system)")
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        assert system is not None
        assert system["DicomAet"] == self.ae_title and system["DicomPort"] == self.dicom_port
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of Orthanc's log, for assertion messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no Orthanc log)"
        return f"--- Orthanc log (tail) ---\n{text[-chars:]}"

    # -- REST ------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """One authenticated REST call; raises ``urllib.error.HTTPError`` on 4xx/5xx."""
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=body,
            method=method,
            headers={"Authorization": f"Basic {token}"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return bytes(answer.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def get_text(self, path: str) -> str | None:
        """A plain-text resource (such as a metadata value), None when absent (404)."""
        try:
            return self.request("GET", path).decode()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def post(self, path: str, payload: Any) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return json.loads(self.request("POST", path, body))

    def upload(self, path: Path) -> dict[str, Any]:
        """``POST /instances`` with a DICOM file; returns Orthanc's answer (ID, ParentStudy)."""
        answer: dict[str, Any] = self.post("/instances", path.read_bytes())
        assert answer.get("Status") == "Success", answer
        return answer

    def tags(self, instance_id: str) -> dict[str, Any]:
        tags: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return tags

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        instances: list[dict[str, Any]] = self.get(f"/studies/{study_id}/instances")
        return instances

    def routing(self, instance_id: str) -> str | None:
        """The auto-forward decision the Lua script wrote for an instance, if any yet."""
        return self.get_text(f"/instances/{instance_id}/metadata/BoneAgeRouting")

    def jobs(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.get("/jobs?expand")
        return jobs
