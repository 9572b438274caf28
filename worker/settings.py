"""One settings object for every process of boneage-worker.

Precedence, highest first: command-line options, ``BONEAGE_*`` environment
variables, a TOML settings file (``--config`` or ``BONEAGE_CONFIG``), defaults.
The environment names are a contract with administrators: they are documented
in the README and tested.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_io.uids import check_uid_root
from worker.cgroups import cpu_quota, memory_limit

logger = logging.getLogger(__name__)

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no control
_DEFAULT_DATA_DIR = Path("./var/boneage")

#: The longest a delivery may wait for its next try: a worker holds its message, not
#: acknowledged, as long, and Redis hands such a message out again after its visibility
#: timeout (4 hours, worker.celery_app), which must stay well the longer.
MAX_RETRY_DELAY_SECONDS = 3 * 3600

#: Images per forward pass of a GPU inference worker unless BONEAGE_INFERENCE_BATCH says.
GPU_INFERENCE_BATCH = 16

#: Batching processes that share a GPU unless BONEAGE_INFERENCE_PROCESSES says, and the
#: host's cores each needs: a process's task threads do their reading, decoding and DICOM
#: work mostly under one interpreter lock (docs/performance.md, "GPU": on an H200 with
#: 16 cores, 1, 2, 4 and 8 processes assessed 17.5, 32.3, 56.6 and 81.1 studies a
#: second, each process keeping 1.5 to 2.3 cores busy; each holds its own CUDA context).
GPU_INFERENCE_PROCESSES = 4
CORES_PER_GPU_PROCESS = 4

#: Memory an inference worker needs at its peak, in a container's memory limit (the
#: control group's charge, measured in one: docs/performance.md, "A container's memory
#: limit"), with a margin: each CPU inference process (0.69 GiB more for each, whether
#: its studies were 5 or 15 megapixels), each batching process on a GPU (1.9 GB on a CPU,
#: its CUDA context's host memory not measured), and the worker's own share besides
#: (0.38 GiB: a prefork parent's torch and model, its children share them).
CPU_INFERENCE_PROCESS_MEMORY = 850 * 2**20
GPU_INFERENCE_PROCESS_MEMORY = 2560 * 2**20
INFERENCE_WORKER_MEMORY = 512 * 2**20

#: BONEAGE_PRECISION's values (models.predictor.PRECISIONS, which a test keeps equal).
Precision = Literal["auto", "float32", "bfloat16", "float16"]

#: Long side, in pixels, the heat-map SC keeps at least unless BONEAGE_SC_MIN_LONG_SIDE
#: says: large images are decoded at reduced resolution only down to it.
SC_MIN_LONG_SIDE = 1000

#: Characters of a destination's text (``AE@host:port``) a delivery's row holds
#: (db.schema.Delivery.destination, which a test keeps equal).
DESTINATION_MAX_LENGTH = 128


#: What a destination's host may be outside brackets: a name or an IPv4 address, with no
#: space, slash, at sign or bracket, which none resolves (a name in Unicode is taken, as
#: the resolver takes it).
_HOST = re.compile(r"[^\s/@\[\]]+")


def _check_ae_title(value: str, what: str) -> str:
    value = value.strip()
    if not value or not _AE_TITLE.match(value):
        raise ValueError(f"{what} {value!r} is not a valid AE title (1-16 printable characters)")
    return value


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE title that may send to us, optionally pinned to a host."""

    ae_title: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedCaller:
        """``AE`` or ``AE@address``; the address an IPv4 or IPv6 one (brackets allowed).

        Raises
        ------
        ValueError
            The title is no AE title, or the host is a name: the listener compares the
            caller's address with it, so a name would refuse every association.
        """
        ae, sep, host = text.strip().partition("@")
        title = _check_ae_title(ae, "allowed calling AE title")
        host = host.strip()
        if not sep:
            return cls(title)
        if not host:
            # a template's address left empty (``PACS@${PACS_IP}``, the variable unset)
            # would let the title in from anywhere
            raise ValueError(
                f"allowed caller {text.strip()!r}: no address after '@' (write the title "
                "alone to let it call from any address)"
            )
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(
                f"allowed caller {text.strip()!r}: the host must be an IP address, not a name "
                "(the listener compares it with the address the caller connects from)"
            ) from None
        return cls(title, str(address))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}" if self.host else self.ae_title


@dataclass(frozen=True)
class Destination:
    """A DICOM node that receives our SR and SC objects (``AE@host:port``)."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = re.fullmatch(r"\s*([^@]+)@(\[[^\]]+\]|[^:]+):(\d+)\s*", text)
        if not match:
            raise ValueError(f"destination {text!r} is not of the form AE@host:port")
        ae, host, port = match.groups()
        port_number = int(port)
        if not 0 < port_number < 65536:
            raise ValueError(f"destination {text!r} has port {port_number} outside 1-65535")
        if host.startswith("["):  # only an IPv6 address is bracketed
            host = host[1:-1]  # as written: deliveries record it so
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(
                    f"destination {text!r}: only an IPv6 address goes in brackets"
                ) from None
        elif not _HOST.fullmatch(host):
            # a space or a slash never resolves: every delivery would fail for a day
            raise ValueError(f"destination {text!r}: {host!r} is no host name or address")
        else:
            try:  # as the resolver takes a name (an empty label, an invisible character)
                host.encode("idna")
            except UnicodeError as exc:
                raise ValueError(
                    f"destination {text!r}: {host!r} is no host name ({exc.__cause__ or exc})"
                ) from None
        return cls(_check_ae_title(ae, "destination AE title"), host, port_number)

    def __str__(self) -> str:
        # An IPv6 address keeps its brackets, or the text would not parse back (it is
        # what deliveries record and what `serve` hands its children).
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
    return value


#: ``BONEAGE_*`` variables that are not settings: the settings file's name, what the
#: Compose file and the demo script read, and the test suite's service addresses.
NOT_SETTINGS = frozenset(
    {"BONEAGE_CONFIG", "BONEAGE_IMAGE_CPU", "BONEAGE_IMAGE_CUDA", "BONEAGE_DEMO_DIR"}
)
_NOT_SETTINGS_PREFIX = "BONEAGE_TEST_"

#: The names of the variables Kubernetes gives every pod for each Service of its namespace
#: (service links): a Service `boneage-listener` makes BONEAGE_LISTENER_SERVICE_HOST,
#: BONEAGE_LISTENER_PORT_11112_TCP_ADDR and more. Not ours: let through, unless a setting.
_SERVICE_LINK = re.compile(
    r"[A-Z0-9_]+_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|PORT_[0-9]+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)"
)
#: ``<NAME>_PORT`` is a service link only with a value ``tcp://10.0.0.7:11112``: named so
#: with a number, it is a misspelt setting (BONEAGE_METRIC_PORT).
_SERVICE_LINK_PORT = re.compile(r"[A-Z0-9_]+_PORT")
_SERVICE_LINK_ADDRESS = re.compile(r"(?:tcp|udp|sctp)://\S+")


def _service_link(name: str, value: str) -> bool:
    """Whether ``name`` (upper case) and ``value`` have the shape of a Kubernetes service
    link variable."""
    if _SERVICE_LINK.fullmatch(name):
        return True
    return bool(_SERVICE_LINK_PORT.fullmatch(name) and _SERVICE_LINK_ADDRESS.fullmatch(value))


def _closest(name: str, fields: Iterable[str]) -> str | None:
    """The field ``name`` is most likely a misspelling of, if any."""
    close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.75)
    return close[0] if close else None


def _unknown_environment(settings_cls: type[BaseSettings]) -> None:
    """Refuse a ``BONEAGE_*`` variable that names no setting: misspelt, it would leave
    the setting at its default without a word. Kubernetes' service links for a Service
    whose name begins with ``boneage-`` are let through (`_service_link`): a setting of
    the same name is read as a setting all the same."""
    known = {f"BONEAGE_{name.upper()}" for name in settings_cls.model_fields}
    for variable, value in sorted(os.environ.items()):
        name = variable.upper()
        if (
            name.startswith("BONEAGE_")
            and name not in known
            and name not in NOT_SETTINGS
            and not name.startswith(_NOT_SETTINGS_PREFIX)
            and not _service_link(name, value)
        ):
            close = _closest(name.removeprefix("BONEAGE_").lower(), settings_cls.model_fields)
            hint = f" (did you mean 'BONEAGE_{close.upper()}'?)" if close else ""
            raise ValueError(
                f"environment variable {variable} is not a setting{hint}; "
                "the settings are listed in the README"
            )


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the ``[boneage]`` table (or the top level) of a TOML file."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            try:
                with path.open("rb") as fh:
                    raw = tomllib.load(fh)
            except FileNotFoundError as exc:
                raise ValueError(f"settings file {path} does not exist") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"settings file {path} is not valid TOML: {exc}") from exc
            table = raw.get("boneage", raw)
            self._data = {str(k).lower(): v for k, v in table.items()}
            # A key misspelt is a setting silently left at its default (a retention
            # that removes what was meant to be kept): the file holds ours alone.
            for key in self._data:
                if key not in settings_cls.model_fields:
                    close = _closest(key, settings_cls.model_fields)
                    hint = f" (did you mean {close!r}?)" if close else ""
                    raise ValueError(f"settings file {path}: {key!r} is not a setting{hint}")

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


#: ``BONEAGE_MISSING_SEX``: what the service does with an image of no recorded sex.
MissingSex = Literal["reject", "female", "male"]


class Settings(BaseSettings):
    """Everything an administrator can set. Environment names: ``BONEAGE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="BONEAGE_", extra="forbid", frozen=True)

    # Network identity
    ae_title: str = "BONEAGE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_aets: Annotated[list[AllowedCaller], NoDecode] = Field(default_factory=list)
    # Associations at once from one peer address (the listener takes 64 in all): one more
    # is rejected, transiently, so one caller cannot shut the PACS out (dicom_io.scp).
    max_associations_per_peer: int = Field(16, ge=1, le=64)
    destinations: Annotated[list[Destination], NoDecode] = Field(default_factory=list)
    # The organisation's root the UIDs of our objects are made under (dicom_io.uids);
    # None: 2.25, UIDs made of UUIDs. An image's objects keep the root its first ones
    # were made under (worker.pipeline.image_uids).
    uid_root: str | None = None

    # Storage and services
    data_dir: Path = _DEFAULT_DATA_DIR
    database_url: str | None = None
    broker_url: str | None = None
    broker_prefix: str = ""

    # Model
    model: Path | None = None
    device: str = "auto"
    arch: str = "resnet50"
    input_size: int = Field(512, ge=32, le=2048)
    # What the network's trunk runs in: auto = float16 autocast on CUDA, float32 on a
    # CPU; bfloat16 on a CPU with bfloat16 instructions is about twice as fast, opt-in
    # after a validation (`evaluate --precision bfloat16`).
    precision: Precision = "auto"
    # Inference worker processes (0 = auto: on a CPU up to 4, each with its share of the
    # cores; on a GPU, batching processes sharing the device, one per 4 cores up to 4)
    # and torch threads in each (0 = cores / processes).
    inference_processes: int = Field(0, ge=0, le=64)
    torch_threads: int = Field(0, ge=0, le=256)
    # Images per forward pass (0 = auto: 16 on a GPU, 1 on a CPU, where batching gains
    # nothing) and how long the first image of a batch waits for others.
    inference_batch: int = Field(0, ge=0, le=256)
    inference_batch_wait_ms: float = Field(10.0, ge=0, le=1000)
    # Smallest long side, in pixels, of the heat-map SC's radiograph when a large image is
    # decoded at reduced resolution (JPEG 2000 wavelet levels, averaged blocks); the
    # network input keeps at least input_size pixels whatever this says, and smaller
    # images are never enlarged. Lower: large JPEG 2000 images decode several times
    # faster on a CPU, at the price of a softer heat-map picture. At most the picture's
    # cap (dicom_io.sc.MAX_LONG_SIDE).
    sc_min_long_side: int = Field(SC_MIN_LONG_SIDE, ge=256, le=2048)

    # Behaviour
    send_not_assessed: bool = False
    missing_sex: MissingSex = "reject"
    # A destination is tried for about a day before its delivery is `failed` (30 s,
    # doubling, then hourly: a PACS down for a night's maintenance gets everything).
    delivery_max_attempts: int = Field(31, ge=1, le=1000)
    delivery_backoff_seconds: float = Field(30.0, gt=0, le=MAX_RETRY_DELAY_SECONDS)
    delivery_backoff_max_seconds: float = Field(3600.0, gt=0, le=MAX_RETRY_DELAY_SECONDS)
    reconcile_interval_seconds: float = Field(60.0, gt=0, le=86400)
    requeue_after_seconds: float = Field(300.0, gt=0, le=86400)
    # Days a finished instance's received file and its SR/SC files are kept once every
    # delivery of it succeeded (its rows and results stay); 0 = kept for ever.
    retention_days: float = Field(30.0, ge=0, le=36500)
    # Free space (MiB) the listener keeps on the data directory's file system for the
    # results of the images it took: while less is free, a C-STORE is answered 0xA700
    # and the PACS sends it again later (dicom_io.scp.SpaceReserve); 0 keeps none.
    min_free_mb: int = Field(1024, ge=0, le=1 << 30)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    # Prometheus /metrics: the listener on metrics_port, a worker on worker_metrics_port
    # (+1 for a worker that consumes only the delivery queue). None or 0 = not served.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    worker_metrics_port: int | None = Field(None, ge=0, le=65534)

    # DICOM over TLS (PS3.15 Annex B): our certificate serves the listener and is
    # presented to destinations; the CA file verifies the peers.
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_ca_certificates: Path | None = None
    tls_require_client_certificate: bool = False
    destinations_tls: bool = False

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value, "BONEAGE_AE_TITLE")

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str | None) -> str | None:
        return None if value is None else check_uid_root(value)

    @field_validator("port", "metrics_port", "worker_metrics_port", mode="before")
    @classmethod
    def _not_a_service_link(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and _SERVICE_LINK_ADDRESS.fullmatch(value.strip()):
            # Kubernetes' service link of a Service named after the setting (`boneage`,
            # `boneage-metrics`): "not a valid integer" would leave one guessing
            name = f"BONEAGE_{str(info.field_name).upper()}"
            raise ValueError(
                f"{value.strip().split('://')[0]}://… is the address Kubernetes gives {name} "
                f"for a Service named {name.removesuffix('_PORT').lower().replace('_', '-')}: "
                "set enableServiceLinks: false in the pod, or rename the Service"
            )
        return value

    @field_validator("allowed_aets", mode="before")
    @classmethod
    def _allowed(cls, value: Any) -> Any:
        return [AllowedCaller.parse(v) if isinstance(v, str) else v for v in _split(value) or []]

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, value: Any) -> Any:
        parsed = [Destination.parse(v) if isinstance(v, str) else v for v in _split(value) or []]
        # Each object goes to a destination once (a delivery is unique per object and
        # destination): a node listed twice would make every assessment's rows clash.
        seen: set[str] = set()
        for destination in parsed:
            key = str(destination)
            if len(key) > DESTINATION_MAX_LENGTH:
                # every delivery to it would fail to be recorded (DataError on PostgreSQL)
                raise ValueError(
                    f"destination {key} is {len(key)} characters long: the database records "
                    f"at most {DESTINATION_MAX_LENGTH} (AE@host:port); name the host by a "
                    "shorter name or by its address"
                )
            if key in seen:
                raise ValueError(f"destination {destination} is listed twice")
            seen.add(key)
        return parsed

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"BONEAGE_DEVICE {value!r} must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _model_not_empty(cls, value: Any) -> Any:
        # An empty value would be the path "." (a directory): a variable set empty by a
        # template or an interpolation is an error, not the untrained model.
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                "BONEAGE_MODEL is empty: set it to a checkpoint file, or leave it unset "
                "for the untrained model"
            )
        return value

    @field_validator("tls_certificate", "tls_private_key", "tls_ca_certificates", mode="before")
    @classmethod
    def _tls_path_not_empty(cls, value: Any, info: ValidationInfo) -> Any:
        # As for BONEAGE_MODEL: an empty value would be the path "." and fail later, at
        # the first association, as a directory that is no certificate.
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                f"BONEAGE_{str(info.field_name).upper()} is empty: set it to a PEM file, "
                "or leave it unset"
            )
        return value

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: str) -> str:
        if value not in {"resnet18", "resnet34", "resnet50"}:
            raise ValueError(f"BONEAGE_ARCH {value!r} must be resnet18, resnet34 or resnet50")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"BONEAGE_LOG_LEVEL {value!r} must be DEBUG, INFO, WARNING or ERROR")
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _absolute_data_dir(self) -> Settings:
        object.__setattr__(self, "data_dir", self.data_dir.expanduser().resolve())
        return self

    @model_validator(mode="after")
    def _prefix_on_redis(self) -> Settings:
        # kombu's transport: the scheme before any "+" (redis+socket:// is Redis's)
        scheme = self.effective_broker_url.partition("://")[0].lower().partition("+")[0]
        if self.broker_prefix and scheme not in ("redis", "rediss", "sentinel"):
            # kombu prefixes Redis keys alone: two nodes told apart by it on one RabbitMQ
            # virtual host would take each other's messages
            raise ValueError(
                "BONEAGE_BROKER_PREFIX keeps nodes apart on a shared Redis only; give a "
                "node on RabbitMQ a virtual host of its own, and leave the prefix empty"
            )
        return self

    @model_validator(mode="after")
    def _backoff_in_order(self) -> Settings:
        if self.delivery_backoff_max_seconds < self.delivery_backoff_seconds:
            raise ValueError(
                f"BONEAGE_DELIVERY_BACKOFF_MAX_SECONDS ({self.delivery_backoff_max_seconds:g}) "
                f"is below BONEAGE_DELIVERY_BACKOFF_SECONDS ({self.delivery_backoff_seconds:g})"
            )
        return self

    @model_validator(mode="after")
    def _precision_fits_the_device(self) -> Settings:
        if self.precision == "float16" and self.device in ("cpu", "mps"):
            usable = "bfloat16 or float32" if self.device == "cpu" else "float32"
            raise ValueError(
                f"BONEAGE_PRECISION float16 runs on CUDA only, not BONEAGE_DEVICE "
                f"{self.device}: use {usable}"
            )
        return self

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError(
                "BONEAGE_TLS_CERTIFICATE and BONEAGE_TLS_PRIVATE_KEY go together: set both or none"
            )
        if self.tls_require_client_certificate and (
            self.tls_certificate is None or self.tls_ca_certificates is None
        ):
            raise ValueError(
                "BONEAGE_TLS_REQUIRE_CLIENT_CERTIFICATE needs BONEAGE_TLS_CERTIFICATE, "
                "BONEAGE_TLS_PRIVATE_KEY and BONEAGE_TLS_CA_CERTIFICATES"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        _unknown_environment(settings_cls)
        config = os.environ.get("BONEAGE_CONFIG")
        return (
            init_settings,
            env_settings,
            _TomlFileSource(settings_cls, Path(config) if config else None),
        )

    def as_environment(self) -> dict[str, str]:
        """Every setting as the ``BONEAGE_*`` variable that gives it back (for children).

        Derived from the fields, so a new setting can never be forgotten on the way
        from `serve` to the processes it starts.
        """
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool):
                text = str(value).lower()
            elif isinstance(value, list):
                text = ",".join(str(item) for item in value)
            else:
                text = str(value)
            env[f"BONEAGE_{name.upper()}"] = text
        return env

    def check_model_file(self) -> None:
        """Refuse a BONEAGE_MODEL that names no readable file.

        Called by the commands that load the model (``work`` for the inference queue,
        ``serve``) before they start anything: a checkpoint path misspelt would
        otherwise stop each inference process as it starts. Not checked for every
        process: the listener and the delivery workers need no model, and may share
        the setting without the volume it is on (a Kubernetes ConfigMap).

        Raises
        ------
        ValueError
            The path does not exist, is not a file, or cannot be read by this user;
            the message is one line that names the path.
        """
        path = self.model
        if path is None:
            return
        if not path.exists():
            raise ValueError(f"BONEAGE_MODEL {path} does not exist")
        if not path.is_file():
            raise ValueError(f"BONEAGE_MODEL {path} is not a file (a .safetensors checkpoint)")
        if not os.access(path, os.R_OK):
            raise ValueError(f"BONEAGE_MODEL {path} cannot be read by this user")

    @property
    def runs_on_cpu(self) -> bool:
        """Whether inference runs on the CPU, decided without touching CUDA.

        The parent of prefork children must not initialise CUDA, so ``auto`` asks
        whether an NVIDIA device node exists rather than asking torch.
        """
        if self.device == "cpu":
            return True
        if self.device == "auto":
            return not Path("/dev/nvidiactl").exists()
        return False

    @property
    def effective_inference_processes(self) -> int:
        """Inference worker processes: the setting, or by default

        - on a CPU, as many as there are cores up to 4 (several single-threaded forward
          passes side by side do more per second than one spread over every core, and
          one image's decoding and DICOM work overlaps another's forward pass);
        - on a GPU, batching processes that share the device, one per
          :data:`CORES_PER_GPU_PROCESS` cores up to :data:`GPU_INFERENCE_PROCESSES`: the
          device outruns what one process's task threads can feed it;
        - on a CPU told to batch (``BONEAGE_INFERENCE_BATCH`` above 1), one;

        and no more than a container's memory limit holds (:meth:`memory_holds`), at
        least one.
        """
        if self.inference_processes:
            return self.inference_processes
        if not self.runs_on_cpu:
            wanted = max(1, min(usable_cpus() // CORES_PER_GPU_PROCESS, GPU_INFERENCE_PROCESSES))
        elif self.effective_inference_batch > 1:
            return 1
        else:
            wanted = max(1, min(usable_cpus(), 4))
        limit = memory_limit()
        return wanted if limit is None else max(1, min(wanted, self.memory_holds(limit)))

    @property
    def inference_process_memory(self) -> int:
        """Bytes one inference process holds at its peak, with a margin (see
        :data:`CPU_INFERENCE_PROCESS_MEMORY` and :data:`GPU_INFERENCE_PROCESS_MEMORY`)."""
        return CPU_INFERENCE_PROCESS_MEMORY if self.runs_on_cpu else GPU_INFERENCE_PROCESS_MEMORY

    def memory_holds(self, limit: int) -> int:
        """Inference processes that ``limit`` bytes hold, beside the worker's own share."""
        return (limit - INFERENCE_WORKER_MEMORY) // self.inference_process_memory

    @property
    def effective_inference_batch(self) -> int:
        """Images per forward pass: the setting, or 16 on a GPU and 1 on a CPU.

        A GPU assesses a batch of 16 in little more time than one image; on this
        project's CPUs batching gained nothing (docs/performance.md), and one image per
        forward pass keeps each image's latency lowest.
        """
        if self.inference_batch:
            return self.inference_batch
        return 1 if self.runs_on_cpu else GPU_INFERENCE_BATCH

    # Derived locations: one place decides where things live in the data dir.
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'boneage.db'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def embedded_broker(self) -> bool:
        return self.effective_broker_url.startswith("sqla+")


def usable_cpus() -> int:
    """CPUs this process may keep busy: those its affinity mask lets it run on (not the
    host's count), and no more than its control group's CPU quota, rounded up.

    A container limited to 4 CPUs on a 64-core host may run on every core but gets 4
    cores' worth of time (worker.cgroups): processes and threads are sized to that.
    """
    try:
        cpus = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def threads_within_cpu_quota() -> None:
    """Size OpenMP's thread teams (torch's, OpenBLAS's) to the CPU quota, if one is lower.

    They are sized by the cores the process may run on, which in a container limited to
    fewer CPUs than its host has are more threads than its quota keeps running
    (worker.cgroups). The command line and the benchmarks call it before anything imports
    torch, so that every command and the processes it starts begin with as many threads
    as the quota feeds; the worker's processes then set their own shares. An
    ``OMP_NUM_THREADS`` already set is kept.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux: no cgroups either
        return
    if (cpus := usable_cpus()) < cores:
        os.environ["OMP_NUM_THREADS"] = str(cpus)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings once for this process.

    Parameters
    ----------
    config_file
        A TOML file (``[boneage]`` table); ``BONEAGE_CONFIG`` names one too.
    **overrides
        Values from the command line; ``None`` means "not given".
    """
    if config_file is not None:
        os.environ["BONEAGE_CONFIG"] = str(config_file)
    given = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**given)


def settings_error(exc: ValueError) -> str:
    """Why `load_settings` refused the settings, in one line for an administrator.

    Built from each error's own message and the setting it is about, never from the
    values given: pydantic's text quotes them, a model-level error every setting at once
    (a database or broker URL among them, with its password).
    """
    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        cause = error.get("ctx", {}).get("error")
        message = str(cause) if error["type"] == "value_error" and cause else error["msg"]
        field, *rest = error["loc"] or ("",)
        if field in Settings.model_fields:
            field = f"BONEAGE_{str(field).upper()}"
        where = " ".join(str(part) for part in (field, *rest) if part != "")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
