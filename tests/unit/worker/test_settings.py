from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from sqlalchemy import String

from db.schema import Delivery
from tests.conftest import REDIS_URL
from tests.support import free_port
from worker.cli import main
from worker.settings import (
    DESTINATION_MAX_LENGTH,
    MAX_RETRY_DELAY_SECONDS,
    AllowedCaller,
    Destination,
    Settings,
    load_settings,
    settings_error,
)

ENV_NAMES = (
    "BONEAGE_AE_TITLE",
    "BONEAGE_PORT",
    "BONEAGE_ALLOWED_AETS",
    "BONEAGE_DESTINATIONS",
    "BONEAGE_DATABASE_URL",
    "BONEAGE_BROKER_URL",
    "BONEAGE_DATA_DIR",
    "BONEAGE_MODEL",
    "BONEAGE_DEVICE",
    "BONEAGE_CONFIG",
    "BONEAGE_TLS_CERTIFICATE",
    "BONEAGE_TLS_PRIVATE_KEY",
    "BONEAGE_TLS_CA_CERTIFICATES",
    "BONEAGE_TLS_REQUIRE_CLIENT_CERTIFICATE",
    "BONEAGE_MISSING_SEX",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        # set first, so that the variable is restored (or removed) after the test
        # whatever the test did to it: load_settings(config_file) sets BONEAGE_CONFIG in
        # os.environ itself, and a later test's settings read that file
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_defaults_are_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.ae_title == "BONEAGE"
    assert settings.port == 11112  # the documented default, not a port the test opens
    assert settings.data_dir == tmp_path / "var" / "boneage"
    assert settings.effective_database_url == f"sqlite:///{tmp_path}/var/boneage/boneage.db"
    assert settings.effective_broker_url == f"sqla+sqlite:///{tmp_path}/var/boneage/broker.db"
    assert settings.embedded_broker
    assert settings.model is None


def test_documented_environment_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port, pacs, archive = free_port(), free_port(), free_port()
    env = {
        "BONEAGE_AE_TITLE": "BONEAGE2",
        "BONEAGE_PORT": str(port),
        "BONEAGE_ALLOWED_AETS": "PACS, MODALITY1@10.0.0.5",
        "BONEAGE_DESTINATIONS": f"PACS@10.0.0.2:{pacs},ARCHIVE@[::1]:{archive}",
        "BONEAGE_DATABASE_URL": "postgresql+psycopg://u@db/boneage",
        "BONEAGE_BROKER_URL": REDIS_URL,
        "BONEAGE_DATA_DIR": str(tmp_path / "data"),
        "BONEAGE_MODEL": str(tmp_path / "m.safetensors"),
        "BONEAGE_DEVICE": "cuda:1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.ae_title == "BONEAGE2"
    assert settings.port == port
    assert settings.allowed_aets == [AllowedCaller("PACS"), AllowedCaller("MODALITY1", "10.0.0.5")]
    assert settings.destinations == [
        Destination("PACS", "10.0.0.2", pacs),
        Destination("ARCHIVE", "::1", archive),
    ]
    assert settings.effective_database_url == "postgresql+psycopg://u@db/boneage"
    assert not settings.embedded_broker
    assert settings.data_dir == tmp_path / "data"
    assert settings.spool_dir == tmp_path / "data" / "spool"
    assert settings.model == tmp_path / "m.safetensors"
    assert settings.device == "cuda:1"
    assert settings.missing_sex == "reject"


@pytest.mark.parametrize(
    ("text", "host"),
    [("MODALITY1@10.0.0.5", "10.0.0.5"), ("MODALITY1@[::1]", "::1"), ("MODALITY1", None)],
)
def test_an_allowed_caller_is_pinned_to_an_address(text: str, host: str | None) -> None:
    assert AllowedCaller.parse(text) == AllowedCaller("MODALITY1", host)


def test_an_allowed_caller_pinned_to_a_host_name_is_refused() -> None:
    """The listener compares the caller's address with the pin: a name refused every
    association, and said only that the title was not allowed (found in review)."""
    with pytest.raises(ValueError, match="the host must be an IP address, not a name"):
        AllowedCaller.parse("MODALITY1@localhost")


def test_precedence_cli_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_file, in_env, on_cli, pacs = free_port(), free_port(), free_port(), free_port()
    config = tmp_path / "boneage.toml"
    config.write_text(
        f'[boneage]\nae_title = "FROMFILE"\nport = {in_file}\ndestinations = ["A@h:{pacs}"]\n'
    )
    monkeypatch.setenv("BONEAGE_PORT", str(in_env))
    settings = load_settings(config)
    assert (settings.ae_title, settings.port) == ("FROMFILE", in_env)
    assert settings.destinations == [Destination("A", "h", pacs)]
    assert load_settings(config, port=on_cli).port == on_cli


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("BONEAGE_DESTINATIONS", "PACS@host", "AE@host:port"),
        ("BONEAGE_DESTINATIONS", "PACS@host:0", "outside 1-65535"),
        ("BONEAGE_DESTINATIONS", "PACS@host:{p}, ARCHIVE@host:{q},PACS@host:{p}", "twice"),
        ("BONEAGE_AE_TITLE", "A_TITLE_THAT_IS_TOO_LONG", "not a valid AE title"),
        ("BONEAGE_DEVICE", "gpu", "auto, cpu, cuda"),
        ("BONEAGE_PORT", "70000", "less than or equal"),
        ("BONEAGE_RECONCILE_INTERVAL_SECONDS", "inf", "less than or equal"),
        ("BONEAGE_RETENTION_DAYS", "inf", "less than or equal"),
        ("BONEAGE_DELIVERY_BACKOFF_MAX_SECONDS", "20000", "less than or equal"),
        ("BONEAGE_DELIVERY_BACKOFF_MAX_SECONDS", "10", "is below BONEAGE_DELIVERY_BACKOFF_SECONDS"),
    ],
)
def test_bad_values_are_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value.format(p=free_port(), q=free_port()))
    with pytest.raises(ValidationError, match=message):
        load_settings()


#: A database password, and a broker's, that a settings error must not show.
PASSWORD = "Sup3rSecretPw"


def _shows_the_password(text: str) -> bool:
    """Whether ``text`` shows any four characters of `PASSWORD` in a row."""
    return any(PASSWORD[i : i + 4] in text for i in range(len(PASSWORD) - 3))


def test_a_settings_error_between_settings_does_not_show_a_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error about two settings at once is the whole model's: pydantic's own text
    quoted every setting given, the database URL's password with them."""
    monkeypatch.setenv("BONEAGE_DELIVERY_BACKOFF_MAX_SECONDS", "10")
    done = CliRunner().invoke(
        main, ["--database-url", f"postgresql+psycopg://boneage:{PASSWORD}@db/boneage", "status"]
    )
    assert done.exit_code == 1
    assert done.output.strip() == (
        "Error: invalid settings: BONEAGE_DELIVERY_BACKOFF_MAX_SECONDS (10) is below "
        "BONEAGE_DELIVERY_BACKOFF_SECONDS (30)"
    )
    assert not _shows_the_password(done.output)


def test_a_settings_error_in_one_setting_does_not_show_a_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failover brokers written as a list in the settings file, not as one string."""
    config = tmp_path / "boneage.toml"
    config.write_text(
        "[boneage]\n"
        f'broker_url = ["redis://:{PASSWORD}@redis-a:6379/0", '
        f'"redis://:{PASSWORD}@redis-b:6379/0"]\n'
    )
    monkeypatch.setenv("BONEAGE_CONFIG", str(config))
    done = CliRunner().invoke(main, ["status"])
    assert done.exit_code == 1
    assert done.output.strip() == (
        "Error: invalid settings: BONEAGE_BROKER_URL: Input should be a valid string"
    )
    assert not _shows_the_password(done.output)


def test_a_destination_reads_back_from_its_text() -> None:
    # The text is what a delivery row records and what its sender parses again.
    port = free_port()
    for text in (
        f"PACS@10.0.0.2:{port}",
        f"V6@[fd00::2]:{port}",
        f"LOCAL@[::1]:{port}",
        f"A@pacs.example:{port}",
    ):
        destination = Destination.parse(text)
        assert str(destination) == text
        assert Destination.parse(str(destination)) == destination
    assert Destination.parse(f"V6@[fd00::2]:{port}").host == "fd00::2"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("PACS@ 10.0.0.2:104", "' 10.0.0.2' is no host name or address"),
        ("PACS@10.0.0.2 :104", "'10.0.0.2 ' is no host name or address"),
        ("PACS@pacs/archive:104", "'pacs/archive' is no host name or address"),
        ("PACS@[pacs.example]:104", "only an IPv6 address goes in brackets"),
        ("PACS@pacs..local:104", "'pacs..local' is no host name (label empty or too long)"),
        ("PACS@pacs\u200e.local:104", r"is no host name (Invalid character '\u200e')"),
    ],
)
def test_a_destination_whose_host_can_never_resolve_is_refused(text: str, said: str) -> None:
    """Taken, it failed every delivery ("host name not resolved") for a day before they
    counted as failed; a bracketed name lost its brackets without a word."""
    with pytest.raises(ValueError, match=re.escape(said)):
        Destination.parse(text)
    assert Destination.parse("PACS@orthanc_pacs:4242").host == "orthanc_pacs"  # Docker's
    # a name in Unicode, which the resolver takes (IDNA), and an IPv6 zone
    assert Destination.parse("PACS@pacs.klinik-müller.de:104").host == "pacs.klinik-müller.de"
    assert Destination.parse("PACS@[fe80::1%eth0]:104").host == "fe80::1%eth0"


def test_an_allowed_caller_with_nothing_after_its_at_sign_is_refused() -> None:
    """``PACS@${PACS_IP}`` with the variable unset: the title was let in from anywhere."""
    with pytest.raises(ValueError, match="no address after '@'"):
        AllowedCaller.parse("MODALITY1@")


def test_a_broker_prefix_is_refused_where_the_broker_is_not_redis(tmp_path: Path) -> None:
    """kombu prefixes Redis keys alone: two nodes told apart by the prefix on one
    RabbitMQ virtual host took each other's messages."""
    with pytest.raises(ValidationError, match="keeps nodes apart on a shared Redis only"):
        load_settings(data_dir=tmp_path, broker_url="amqp://u:p@rabbit:5672/v", broker_prefix="a")
    with pytest.raises(ValidationError, match="keeps nodes apart on a shared Redis only"):
        load_settings(data_dir=tmp_path, broker_prefix="a")  # the embedded broker
    for url in ("redis://127.0.0.1:6379/0", "redis+socket:///run/redis/redis.sock"):
        settings = load_settings(data_dir=tmp_path, broker_url=url, broker_prefix="a")
        assert settings.broker_prefix == "a"


def test_a_destination_longer_than_its_database_column_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its deliveries' rows would not be recorded (a DataError on PostgreSQL, for every
    image): refused when the settings are read, naming the limit."""
    port = free_port()
    fill = DESTINATION_MAX_LENGTH - len(f"PACS@.radiology.example:{port}")
    # labels of at most 63 characters, as a name that resolves has
    longest = f"PACS@{'h' * (fill - 41)}.{'h' * 40}.radiology.example:{port}"
    assert len(longest) == DESTINATION_MAX_LENGTH
    monkeypatch.setenv("BONEAGE_DESTINATIONS", longest)
    assert [str(d) for d in load_settings().destinations] == [longest]
    too_long = f"PACS@{'h' * (fill - 40)}.{'h' * 40}.radiology.example:{port}"
    monkeypatch.setenv("BONEAGE_DESTINATIONS", too_long)
    message = "is 129 characters long: the database records at most 128"
    with pytest.raises(ValidationError, match=re.escape(message)):
        load_settings()
    # the limit is the column's
    column = Delivery.__table__.c.destination.type
    assert isinstance(column, String) and column.length == DESTINATION_MAX_LENGTH


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("BONEAGE_RETENTON_DAYS", "did you mean 'BONEAGE_RETENTION_DAYS'"),
        ("BONEAGE_DESTINATION", "did you mean 'BONEAGE_DESTINATIONS'"),
        (
            "boneage_missing_sexe",
            "boneage_missing_sexe is not a setting (did you mean 'BONEAGE_MISSING_SEX'?)",
        ),
        ("BONEAGE_COLOUR", "BONEAGE_COLOUR is not a setting; the settings are listed"),
    ],
)
def test_a_misspelt_environment_variable_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, message: str
) -> None:
    # Misspelt, it would leave its setting at the default without a word: files kept
    # 30 days that were meant to be kept for ever, results not sent.
    monkeypatch.setenv(variable, "0")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_settings()


def test_variables_that_are_not_settings_but_ours_are_let_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("BONEAGE_IMAGE_CPU", "BONEAGE_IMAGE_CUDA", "BONEAGE_DEMO_DIR", "BONEAGE_TEST_X"):
        monkeypatch.setenv(name, "anything")
    config = tmp_path / "boneage.toml"
    config.write_text("[boneage]\nretention_days = 0\n")
    monkeypatch.setenv("BONEAGE_CONFIG", str(config))
    assert load_settings().retention_days == 0


def test_kubernetes_service_links_are_let_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Kubernetes gives each pod for the Service `boneage-listener`
    (deploy/kubernetes/listener.yaml) where service links are on: every command stopped
    at its start on them."""
    port = str(free_port())
    for name, value in {
        "BONEAGE_LISTENER_SERVICE_HOST": "10.96.0.17",
        "BONEAGE_LISTENER_SERVICE_PORT": port,
        "BONEAGE_LISTENER_SERVICE_PORT_DICOM": port,
        "BONEAGE_LISTENER_PORT": f"tcp://10.96.0.17:{port}",
        f"BONEAGE_LISTENER_PORT_{port}_TCP": f"tcp://10.96.0.17:{port}",
        f"BONEAGE_LISTENER_PORT_{port}_TCP_PROTO": "tcp",
        f"BONEAGE_LISTENER_PORT_{port}_TCP_PORT": port,
        f"BONEAGE_LISTENER_PORT_{port}_TCP_ADDR": "10.96.0.17",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BONEAGE_RETENTION_DAYS", "0")
    assert load_settings().retention_days == 0


def test_settings_named_like_service_links_are_still_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The port settings end in _PORT, as a service link does: read, and a misspelling of
    one, with a port number for its value, is still refused."""
    listener, metrics, worker_metrics = free_port(), free_port(), free_port()
    monkeypatch.setenv("BONEAGE_PORT", str(listener))
    monkeypatch.setenv("BONEAGE_METRICS_PORT", str(metrics))
    monkeypatch.setenv("BONEAGE_WORKER_METRICS_PORT", str(worker_metrics))
    settings = load_settings()
    assert (settings.port, settings.metrics_port, settings.worker_metrics_port) == (
        listener,
        metrics,
        worker_metrics,
    )
    monkeypatch.setenv("BONEAGE_METRIC_PORT", str(metrics))
    with pytest.raises(ValueError, match=re.escape("did you mean 'BONEAGE_METRICS_PORT'")):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "service"),
    [
        ("BONEAGE_PORT", "boneage"),
        ("BONEAGE_METRICS_PORT", "boneage-metrics"),
        ("BONEAGE_WORKER_METRICS_PORT", "boneage-worker-metrics"),
    ],
)
def test_a_service_link_in_a_settings_name_says_so(
    monkeypatch: pytest.MonkeyPatch, variable: str, service: str
) -> None:
    """A Service named after a port setting gives it Kubernetes' address of the Service:
    refused, naming service links, not as "not a valid integer"."""
    monkeypatch.setenv(variable, f"tcp://10.96.0.17:{free_port()}")
    with pytest.raises(ValidationError) as refused:
        load_settings()
    said = settings_error(refused.value)
    assert f"{variable}: tcp://… is the address Kubernetes gives {variable}" in said
    assert f"for a Service named {service}" in said
    assert "enableServiceLinks: false" in said
    assert "10.96.0.17" not in said


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[boneage]\nretenton_days = 0\n",
            "'retenton_days' is not a setting (did you mean 'retention_days'?)",
        ),
        ('[boneage]\ndestination = ["PACS@h:{port}"]\n', "did you mean 'destinations'"),
        ("[boneageworker]\nretention_days = 0\n", "'boneageworker' is not a setting"),
        ("retention_days = 0\nspeed = 3\n", "'speed' is not a setting"),
    ],
)
def test_a_misspelt_key_or_table_in_the_settings_file_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "boneage.toml"
    config.write_text(text.replace("{port}", str(free_port())))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_settings(config)


def test_a_delivery_is_tried_for_about_a_day_and_never_waits_past_the_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.celery_app import broker_transport_options
    from worker.delivery import backoff_seconds

    settings = load_settings()
    waits = [
        backoff_seconds(
            attempt, settings.delivery_backoff_seconds, settings.delivery_backoff_max_seconds
        )
        for attempt in range(1, settings.delivery_max_attempts)
    ]
    # A PACS down for a night's maintenance still gets everything (8 attempts gave 64 min).
    assert 24 * 3600 <= sum(waits) <= 26 * 3600
    # Redis hands out again a message held past its visibility timeout: a retry's
    # countdown must end first.
    monkeypatch.setenv("BONEAGE_BROKER_URL", REDIS_URL)
    redis = load_settings()
    visibility = broker_transport_options(redis)["visibility_timeout"]
    assert max(waits) <= MAX_RETRY_DELAY_SECONDS < visibility


def test_missing_settings_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_tls_files_go_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BONEAGE_TLS_CERTIFICATE", str(tmp_path / "cert.pem"))
    with pytest.raises(ValidationError, match="set both or none"):
        load_settings()
    monkeypatch.setenv("BONEAGE_TLS_PRIVATE_KEY", str(tmp_path / "key.pem"))
    monkeypatch.setenv("BONEAGE_TLS_REQUIRE_CLIENT_CERTIFICATE", "true")
    with pytest.raises(ValidationError, match=r"needs .*BONEAGE_TLS_CA_CERTIFICATES"):
        load_settings()
    monkeypatch.setenv("BONEAGE_TLS_CA_CERTIFICATES", str(tmp_path / "ca.pem"))
    settings = load_settings()
    assert (
        settings.tls_require_client_certificate
        and settings.tls_ca_certificates == tmp_path / "ca.pem"
    )


@pytest.mark.parametrize(
    "name", ["BONEAGE_TLS_CERTIFICATE", "BONEAGE_TLS_PRIVATE_KEY", "BONEAGE_TLS_CA_CERTIFICATES"]
)
def test_an_empty_tls_file_is_an_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # read as a path it would be ".", and the first association would fail on it
    monkeypatch.setenv(name, " ")
    with pytest.raises(ValidationError, match=f"{name} is empty: set it to a PEM file"):
        load_settings()


def test_environment_for_children_gives_back_every_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `serve` hands its children: each field, from CLI, file or environment.
    settings = load_settings(
        data_dir=tmp_path,
        port=free_port(),
        allowed_aets="PACS@10.0.0.2,RIS",
        destinations=f"PACS@10.0.0.2:{free_port()},V6@[fd00::2]:{free_port()}",
        missing_sex="female",
        send_not_assessed=True,
        metrics_port=free_port(),
    )
    for key, value in settings.as_environment().items():
        monkeypatch.setenv(key, value)
    assert load_settings() == settings


def test_inference_processes_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.settings.usable_cpus", lambda: 8)
    assert Settings(device="cpu").effective_inference_processes == 4  # capped at 4
    assert Settings(device="cuda:1").effective_inference_processes == 2  # one per 4 cores
    assert Settings(device="cpu", inference_processes=6).effective_inference_processes == 6
    monkeypatch.setattr("worker.settings.usable_cpus", lambda: 2)
    assert Settings(device="cpu").effective_inference_processes == 2
    assert Settings(device="cuda").effective_inference_processes == 1  # at least one
    monkeypatch.setattr("worker.settings.usable_cpus", lambda: 64)
    assert Settings(device="cuda").effective_inference_processes == 4  # capped at 4
    assert Settings(device="cuda", inference_processes=8).effective_inference_processes == 8
    assert Settings(device="cpu").runs_on_cpu and not Settings(device="cuda").runs_on_cpu


def test_inference_batch_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.settings.usable_cpus", lambda: 8)
    assert Settings(device="cpu").effective_inference_batch == 1
    gpu = Settings(device="cuda:0")
    # two batching processes share the GPU, each batching up to 16 images
    assert (gpu.effective_inference_batch, gpu.effective_inference_processes) == (16, 2)
    batching_cpu = Settings(device="cpu", inference_batch=4)
    assert batching_cpu.effective_inference_batch == 4
    assert batching_cpu.effective_inference_processes == 1  # one process; its threads batch
    two = Settings(device="cpu", inference_batch=4, inference_processes=2)
    assert (two.effective_inference_batch, two.effective_inference_processes) == (4, 2)
    assert Settings().inference_batch_wait_ms == 10.0


def test_inference_batch_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BONEAGE_INFERENCE_BATCH", "8")
    monkeypatch.setenv("BONEAGE_INFERENCE_BATCH_WAIT_MS", "25")
    settings = Settings()
    assert (settings.inference_batch, settings.inference_batch_wait_ms) == (8, 25.0)
    monkeypatch.setenv("BONEAGE_INFERENCE_PROCESSES", "2")  # two batching processes
    assert Settings().effective_inference_processes == 2


def test_inference_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BONEAGE_INFERENCE_PROCESSES", "3")
    monkeypatch.setenv("BONEAGE_TORCH_THREADS", "2")
    settings = Settings()
    assert (settings.inference_processes, settings.torch_threads) == (3, 2)
    monkeypatch.setenv("BONEAGE_INFERENCE_PROCESSES", "-1")
    with pytest.raises(ValidationError, match="inference_processes"):
        Settings()


def test_heat_map_floor_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().sc_min_long_side == 1000
    monkeypatch.setenv("BONEAGE_SC_MIN_LONG_SIDE", "700")
    assert Settings().sc_min_long_side == 700
    for bad in ("100", "4096", "wide"):  # under the smallest sensible picture, over the cap
        monkeypatch.setenv("BONEAGE_SC_MIN_LONG_SIDE", bad)
        with pytest.raises(ValidationError, match="sc_min_long_side"):
            Settings()


def test_precision_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().precision == "auto"  # float16 on CUDA, float32 on a CPU
    monkeypatch.setenv("BONEAGE_PRECISION", "bfloat16")
    assert Settings().precision == "bfloat16"
    monkeypatch.setenv("BONEAGE_PRECISION", "half")
    with pytest.raises(ValidationError, match="precision"):
        Settings()
    monkeypatch.setenv("BONEAGE_PRECISION", "float16")
    monkeypatch.setenv("BONEAGE_DEVICE", "cpu")
    with pytest.raises(ValidationError, match="float16 runs on CUDA only"):
        Settings()
