"""The deployment files in deploy/: parsed and checked against the code they run.

Every ``BONEAGE_*`` name must be a field of ``Settings``, every command line must parse
with the real CLI, the spool volume must be shared at the same path, the Orthanc
configuration for compose must be the reviewed one with the documented changes only.
Where the real validators exist (``systemd-analyze verify``, ``kubectl kustomize``,
``docker compose config``) they run too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click
import pytest
import yaml

from worker.celery_app import DELIVERY_QUEUE, INFERENCE_QUEUE
from worker.cli import main as cli_main
from worker.settings import CORES_PER_GPU_PROCESS, GPU_INFERENCE_PROCESSES, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILES = {
    "cpu": DEPLOY / "docker" / "Dockerfile.cpu",
    "cuda": DEPLOY / "docker" / "Dockerfile.cuda",
}
DATA_DIR = "/var/lib/boneage"
BINARY = "/opt/boneage/venv/bin/boneage-worker"
BONEAGE_SERVICES = ("migrate", "listener", "worker-cpu", "worker-gpu")
SPOOL_USERS = ("listener", "worker-cpu", "worker-gpu")


@pytest.fixture(autouse=True)
def _no_boneage_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings built here must come from the files alone, not from this shell."""
    for name in list(os.environ):
        if name.startswith("BONEAGE_"):
            monkeypatch.delenv(name)


# -- helpers ----------------------------------------------------------------------


def _setting_field(env_name: str) -> str:
    assert env_name.startswith("BONEAGE_"), f"{env_name} is not a BONEAGE_* setting"
    field = env_name.removeprefix("BONEAGE_").lower()
    assert field in Settings.model_fields, (
        f"{env_name} is not a setting (worker/settings.py has no field {field!r})"
    )
    return field


def _settings_from_env(env: dict[str, str]) -> Settings:
    """Validate values the way a process would read them. ``TZ``, the one other variable
    the files may set (the hospital's time zone, which dates the SR and SC), must name a
    time zone this machine knows."""
    if "TZ" in env:
        ZoneInfo(env["TZ"])
    return Settings.model_validate(
        {_setting_field(name): value for name, value in env.items() if name != "TZ"}
    )


def _check_cli(args: list[str]) -> click.Context:
    """Parse a boneage-worker command line with the real CLI (types and choices too)."""
    ctx = cli_main.make_context("boneage-worker", list(args))
    command: click.Command = cli_main
    while isinstance(command, click.Group):
        pending = [*getattr(ctx, "_protected_args", []), *ctx.args]
        assert pending, f"{args}: no sub-command"
        name, sub, rest = command.resolve_command(ctx, pending)
        assert sub is not None and name is not None, f"{args}: unknown command"
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub
    if ctx.command.name == "work":
        queues = {q.strip() for q in ctx.params["queues"].split(",") if q.strip()}
        assert queues and queues <= {INFERENCE_QUEUE, DELIVERY_QUEUE}, args
    return ctx


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    """Compose's ${NAME:-default} with NAME unset."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


def _load_all(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


# -- YAML ---------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = _yaml_files()
    assert COMPOSE_FILE in files and K8S / "kustomization.yaml" in files
    for path in files:
        docs = _load_all(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(doc, dict) for doc in docs), path


# -- docker compose -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = _load_all(COMPOSE_FILE)
    return doc


def _volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source, from the short volume syntax."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        mounts[target] = source
    return mounts


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "orthanc", *BONEAGE_SERVICES}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: build context must be the repository root"
            assert (context / service["build"]["dockerfile"]).is_file(), name
    assert services["worker-gpu"]["build"]["dockerfile"] == "deploy/docker/Dockerfile.cuda"
    for name in ("migrate", "listener", "worker-cpu"):
        assert services[name]["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"

    # Ordering: PostgreSQL healthy -> migrate done -> listener and workers.
    assert "test" in services["postgres"]["healthcheck"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    for name in SPOOL_USERS:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name

    assert "11112:11112" in services["listener"]["ports"]  # the published port, not a test port
    for name in BONEAGE_SERVICES:
        _check_cli(_interpolate(services[name]["command"]))
    assert _check_cli(services["listener"]["command"]).command.name == "listen"
    cpu = _check_cli(_interpolate(services["worker-cpu"]["command"]))
    assert set(cpu.params["queues"].split(",")) == {INFERENCE_QUEUE, DELIVERY_QUEUE}
    gpu = _check_cli(services["worker-gpu"]["command"])
    assert gpu.params["queues"] == INFERENCE_QUEUE and gpu.params["pool"] == "threads"


def test_compose_gpu_worker_is_a_profile_with_an_nvidia_device(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count", 1) == 1  # one inference process per GPU
    for name, service in services.items():
        if name != "worker-gpu":
            assert "profiles" not in service, f"{name} must start without a profile"


def test_compose_spool_is_one_volume_at_one_path(compose: dict[str, Any]) -> None:
    services = compose["services"]
    sources = set()
    for name in SPOOL_USERS:
        environment = services[name]["environment"]
        assert environment["BONEAGE_DATA_DIR"] == DATA_DIR, name
        mounts = _volume_mounts(services[name])
        assert DATA_DIR in mounts, f"{name} does not mount {DATA_DIR}"
        sources.add(mounts[DATA_DIR])
    assert len(sources) == 1, f"listener and workers mount different volumes: {sources}"
    (volume,) = sources
    assert volume in compose["volumes"], "the spool must be a named volume"


def test_compose_environment_is_real_settings(compose: dict[str, Any]) -> None:
    for name in BONEAGE_SERVICES:
        environment = _interpolate(compose["services"][name]["environment"])
        settings = _settings_from_env(environment)
        assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://")
        assert settings.broker_url and settings.broker_url.startswith("redis://redis:")
        assert not settings.embedded_broker
        assert [str(d) for d in settings.destinations] == ["ORTHANC@orthanc:4242"]  # compose value
        assert [str(a) for a in settings.allowed_aets] == ["ORTHANC"]
        assert settings.model is None  # unset: never an empty BONEAGE_MODEL
        assert "TZ" in environment  # the hospital's time zone, a container's being UTC
    gpu = _settings_from_env(_interpolate(compose["services"]["worker-gpu"]["environment"]))
    assert gpu.device.startswith("cuda")
    # Database credentials agree with the PostgreSQL service.
    postgres = _interpolate(compose["services"]["postgres"]["environment"])
    url = _interpolate(compose["services"]["listener"]["environment"]["BONEAGE_DATABASE_URL"])
    user, db = postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]
    assert url == f"postgresql+psycopg://{user}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{db}"


def test_compose_orthanc_forwards_to_the_listener(compose: dict[str, Any]) -> None:
    orthanc = compose["services"]["orthanc"]
    mounts = _volume_mounts(orthanc)
    config_target = orthanc["command"][-1]
    config_source = DEPLOY / mounts[config_target]
    lua_target = str(Path(config_target).with_name("autoforward.lua"))
    assert (DEPLOY / mounts[lua_target]).resolve() == DEPLOY / "orthanc" / "autoforward.lua"

    reference = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    config = json.loads(config_source.read_text())
    assert config["LuaScripts"] == ["autoforward.lua"]  # resolved next to the config file

    # The compose copy is the reviewed configuration with these changes only.
    expected = json.loads(json.dumps(reference))
    expected["Name"] = config["Name"]
    expected["RemoteAccessAllowed"] = True
    expected["DicomCheckModalityHost"] = False
    expected["DicomModalities"]["BONEAGE"]["Host"] = "listener"
    assert config == expected

    listener_env = _interpolate(compose["services"]["listener"]["environment"])
    settings = _settings_from_env(listener_env)
    boneage = config["DicomModalities"]["BONEAGE"]
    assert (boneage["AET"], boneage["Port"]) == (settings.ae_title, settings.port)
    assert boneage["AllowStore"] is True  # results come back from BONEAGE
    (destination,) = settings.destinations
    assert (destination.ae_title, destination.host, destination.port) == (
        config["DicomAet"],
        "orthanc",
        config["DicomPort"],
    )
    assert config["DicomAet"] in {a.ae_title for a in settings.allowed_aets}
    assert f"{config['DicomPort']}:{config['DicomPort']}" in orthanc["ports"]


def _docker_compose() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return command
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    command = _docker_compose()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    # `config` validates against the compose specification; no daemon needed.
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--profile", "gpu", "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# -- Dockerfiles --------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, f"{path} ends with a continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _packages() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        project = tomllib.load(fh)
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    return [pattern.rstrip("*") for pattern in includes]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    instructions = _instructions(path)
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    runtime = instructions[stages[-1] :]
    text = path.read_text()

    copied: set[str] = set()
    for op, args in instructions:
        if op == "COPY" and not args.startswith("--from"):
            sources = args.split()[:-1]
            assert "." not in sources, "copy named files, not the whole context"
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                copied.add(source.rstrip("/"))
    assert {"pyproject.toml", "README.md", *_packages()} <= copied

    assert re.search(r"useradd\b[^\n]*--uid 10001\b", text), "non-root user boneage, uid 10001"
    users = [args for op, args in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert ("VOLUME", f'["{DATA_DIR}"]') in runtime
    assert ("ENTRYPOINT", '["boneage-worker"]') in runtime
    (cmd,) = [json.loads(args) for op, args in runtime if op == "CMD"]
    _check_cli(cmd)
    (healthcheck,) = [args for op, args in runtime if op == "HEALTHCHECK"]
    probe = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert probe[0] == "boneage-worker"
    _check_cli(probe[1:])
    # Docker keeps each check's output: the problems only, not the report's reasons
    assert probe[1:] == ["status", "--quiet"]
    assert "dcmtk" not in text.split("apt-get install", 1)[-1].split("\n", 1)[0]

    bases = " ".join(args for op, args in instructions if op in {"FROM", "ARG"})
    if flavour == "cpu":
        assert "python:3.11-slim" in bases
        assert "https://download.pytorch.org/whl/cpu" in text
    else:
        assert "nvidia/cuda:" in bases


def test_dockerfile_copies_enough_to_build_the_package(tmp_path: Path) -> None:
    """`pip install .` in the image sees only what the Dockerfile copies: build from that."""
    context = tmp_path / "src"
    context.mkdir()
    for op, args in _instructions(DOCKERFILES["cpu"]):
        if op == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                origin = ROOT / source
                if origin.is_dir():
                    shutil.copytree(
                        origin, context / source, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    shutil.copy2(origin, context / source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    result = subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "boneage-worker = worker.cli:main" in archive.read(entry_points).decode()
    for package in _packages():
        assert f"{package}/__init__.py" in names, package
    assert "db/migrations/script.py.mako" in names  # Alembic needs it at run time
    assert any(n.startswith("db/migrations/versions/") for n in names)


# -- Kubernetes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _load_all(path):
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path.name}: {key} missing"
            assert doc["metadata"].get("name"), path.name
            assert "namespace" not in doc["metadata"], f"{path.name}: namespace-agnostic"
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _load_all(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert "namespace" not in kustomization
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk


#: The image each manifest names, by flavour: a name for kustomization.yaml's `images:`
#: to give a release's tag, never one that is pulled as it stands.
IMAGES = {"cpu": "boneage-worker-cpu", "cuda": "boneage-worker-cuda"}


def _version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def test_kubernetes_pods_run_this_releases_images() -> None:
    """A tag moved to each new build (boneage-worker:cpu) with imagePullPolicy
    IfNotPresent leaves a node that pulled it once on the old code, against a database
    the new one migrated (check_schema then stops it). Every image is given this
    release's tag, which names one build, by kustomization.yaml."""
    (kustomization,) = _load_all(K8S / "kustomization.yaml")
    images = {entry["name"]: entry for entry in kustomization["images"]}
    assert set(images) == set(IMAGES.values())
    for flavour, name in IMAGES.items():
        entry = images[name]
        assert entry["newTag"] == f"{_version()}-{flavour}", name
        assert entry["newName"].endswith("boneage-worker"), name
        assert "digest" not in entry  # a digest would stand for the tag it was taken from
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _load_all(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec")
            if pod is None:
                continue
            for container in pod.get("initContainers", []) + pod["containers"]:
                assert container["image"] in images, f"{path.name}: {container['image']}"
                # Always would make every pod start depend on the registry; Never, on
                # what a node happens to hold
                assert container.get("imagePullPolicy", "IfNotPresent") == "IfNotPresent"


def test_kubernetes_listener_migrates_the_database_before_it_starts(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """A migration Job is immutable and kept a day after it ran: `kubectl apply -k` of a
    new release skipped it (the Job unchanged) or failed on it (changed), and the new
    pods, whose schema check wants their own revision, restarted until someone deleted
    it. The listener's pod migrates first, each time it starts, with its own image, one
    at a time (one replica, the old pod gone first)."""
    assert not any(kind == "Job" for kind, _ in k8s)
    deployment = k8s[("Deployment", "boneage-listener")]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]
    assert _check_cli(migrate["args"]).command.name == "upgrade"
    assert migrate["args"] == ["db", "upgrade"]
    (listener,) = pod["containers"]
    assert migrate["image"] == listener["image"]
    assert migrate["envFrom"] == listener["envFrom"]  # the same database
    for name, other in _pod_specs(k8s).items():
        if name != "boneage-listener":
            assert "initContainers" not in other, f"{name}: only one pod migrates"


def _pod_specs(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: doc["spec"]["template"]["spec"]
        for (kind, name), doc in k8s.items()
        if kind in {"Deployment", "Job"}
    }


def test_kubernetes_workloads(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    pods = _pod_specs(k8s)
    assert set(pods) == {
        "boneage-listener",
        "boneage-worker-inference",
        "boneage-worker-delivery",
    }
    config = k8s[("ConfigMap", "boneage-config")]["data"]
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod.get("initContainers", []) + pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert security["readOnlyRootFilesystem"] is True, name
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: read-only root needs a writable /tmp"
            for mount_name in mounts.values():
                assert mount_name in volumes, f"{name}: volume {mount_name} not declared"
            for source in container["envFrom"]:
                ref = source.get("configMapRef") or source["secretRef"]
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                assert (kind, ref["name"]) in k8s, f"{name}: {kind} {ref['name']} missing"
            for variable in container.get("env", []):
                _setting_field(variable["name"])
            context = _check_cli(container["args"])
            assert container["image"] in IMAGES.values(), f"{name}: {container['image']}"
            if context.command.name in {"listen", "work"}:
                # Every listener and worker mounts the shared spool at BONEAGE_DATA_DIR.
                assert config["BONEAGE_DATA_DIR"] == DATA_DIR
                claim = volumes[mounts[DATA_DIR]]["persistentVolumeClaim"]["claimName"]
                pvc = k8s[("PersistentVolumeClaim", claim)]
                assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for (kind, name), doc in k8s.items():
        if kind == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), name


def _service_links(service: dict[str, Any]) -> set[str]:
    """The variables Kubernetes gives every pod of the namespace for ``service``."""
    name = service["metadata"]["name"].upper().replace("-", "_")
    links = {f"{name}_SERVICE_HOST", f"{name}_SERVICE_PORT", f"{name}_PORT"}
    for port in service["spec"]["ports"]:
        if "name" in port:
            links.add(f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
        tcp = f"{name}_PORT_{port['port']}_{port.get('protocol', 'TCP')}"
        links |= {tcp, f"{tcp}_PROTO", f"{tcp}_PORT", f"{tcp}_ADDR"}
    return links


def test_kubernetes_pods_get_no_service_links(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Service links for the Service boneage-listener are BONEAGE_LISTENER_* variables,
    which the settings took for misspelt ones: every command stopped at its start. No pod
    gets them, and none a Service makes would name a setting."""
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _load_all(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec")
            if pod is not None:
                assert pod.get("enableServiceLinks") is False, f"{path.name}: service links on"
    assert "BONEAGE_LISTENER_PORT" in _service_links(k8s[("Service", "boneage-listener")])
    settings = {f"BONEAGE_{name.upper()}" for name in Settings.model_fields}
    for (kind, name), doc in k8s.items():
        if kind == "Service":
            assert not _service_links(doc) & settings, name


def test_kubernetes_gpu_worker_one_process_per_gpu(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (container,) = _pod_specs(k8s)["boneage-worker-inference"]["containers"]
    assert container["image"] == IMAGES["cuda"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    context = _check_cli(container["args"])
    assert context.params["queues"] == INFERENCE_QUEUE
    assert context.params["pool"] == "threads"
    (delivery,) = _pod_specs(k8s)["boneage-worker-delivery"]["containers"]
    assert _check_cli(delivery["args"]).params["queues"] == DELIVERY_QUEUE
    assert "nvidia.com/gpu" not in delivery.get("resources", {}).get("limits", {})
    # The pod holds the default batching processes at the host memory one was measured to
    # reach on a CPU (docs/performance.md, "Host memory of a batching worker"), which a
    # GPU's CUDA context only adds to. It asked for 4 GiB (8 at most); four held 16.5 GB.
    memory = container["resources"]["requests"]["memory"]
    assert memory.endswith("Gi")
    assert int(memory.removesuffix("Gi")) * 2**30 >= GPU_INFERENCE_PROCESSES * 1.9e9
    # its limit is the worker's memory limit (worker.cgroups): it must hold them too
    memory_limit = int(container["resources"]["limits"]["memory"].removesuffix("Gi")) * 2**30
    assert Settings(device="cuda").memory_holds(memory_limit) >= GPU_INFERENCE_PROCESSES
    # The scheduler places it by the cores its processes keep busy: four kept 7.71 busy on
    # an H200's host (docs/performance.md, "GPU"). It asked for 1. Its CPU limit is the
    # cgroup quota the worker sizes its processes to (worker.cgroups): the default ones.
    resources = container["resources"]
    assert _cores(resources["requests"]["cpu"]) >= GPU_INFERENCE_PROCESSES * 1.9
    cpu_limit = _cores(resources["limits"]["cpu"])
    assert cpu_limit // CORES_PER_GPU_PROCESS == GPU_INFERENCE_PROCESSES


def _cores(quantity: str | int) -> float:
    """A Kubernetes CPU quantity ("8", "250m", 2) in cores."""
    text = str(quantity)
    return int(text.removesuffix("m")) / 1000 if text.endswith("m") else float(text)


def test_kubernetes_gpu_workers_roll_out_without_a_spare_gpu(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """A rolling update that starts a new GPU pod before the old one stops (the default,
    maxSurge 25 %: one pod) leaves it Pending on a cluster with no spare GPU, and the
    rollout never finishes: the old pods must go first."""
    checked = []
    for (kind, name), doc in k8s.items():
        if kind != "Deployment":
            continue
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        if "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}):
            continue
        strategy = doc["spec"].get("strategy", {"type": "RollingUpdate"})
        if strategy["type"] != "Recreate":
            rolling = strategy.get("rollingUpdate", {})
            assert strategy["type"] == "RollingUpdate", name
            assert str(rolling.get("maxSurge", "25%")) in {"0", "0%"}, f"{name}: no surge pod"
            assert str(rolling.get("maxUnavailable", "25%")) not in {"0", "0%"}, name
        checked.append(name)
    assert checked == ["boneage-worker-inference"]


def test_kubernetes_pods_change_the_data_volumes_group_only_when_its_root_differs(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """With fsGroup alone the kubelet changes the group of every file on the volume at
    each pod start: the whole spool and outbox, on a shared volume, while the pod waits."""
    checked = []
    for name, pod in _pod_specs(k8s).items():
        claims = {
            volume["persistentVolumeClaim"]["claimName"]
            for volume in pod.get("volumes", [])
            if "persistentVolumeClaim" in volume
        }
        context = pod["securityContext"]
        if "boneage-data" in claims and "fsGroup" in context:
            assert context.get("fsGroupChangePolicy") == "OnRootMismatch", name
            checked.append(name)
    assert sorted(checked) == [
        "boneage-listener",
        "boneage-worker-delivery",
        "boneage-worker-inference",
    ]


def test_kubernetes_listener_probes_and_service(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = k8s[("Deployment", "boneage-listener")]
    assert deployment["spec"]["replicas"] == 1
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings_port = int(k8s[("ConfigMap", "boneage-config")]["data"]["BONEAGE_PORT"])
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["tcpSocket"]["port"]
        assert ports.get(port, port) == settings_port
    service = k8s[("Service", "boneage-listener")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert ports.get(service_port["targetPort"], service_port["targetPort"]) == settings_port


def test_kubernetes_settings_are_real(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    config = k8s[("ConfigMap", "boneage-config")]["data"]
    secret = k8s[("Secret", "boneage-secrets")]["stringData"]
    assert "BONEAGE_DATABASE_URL" in secret and "BONEAGE_DATABASE_URL" not in config
    assert "TZ" in config  # the hospital's time zone, a container's being UTC
    settings = _settings_from_env({**config, **secret})
    assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://")
    assert settings.broker_url and settings.broker_url.startswith("redis://")


def test_keda_scales_gpu_workers_on_the_inference_list(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    scaled = [doc for (kind, _), doc in k8s.items() if kind == "ScaledObject"]
    (scaled_object,) = scaled
    target = scaled_object["spec"]["scaleTargetRef"]["name"]
    assert ("Deployment", target) in k8s
    (container,) = k8s[("Deployment", target)]["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" in container["resources"]["limits"]
    (trigger,) = scaled_object["spec"]["triggers"]
    assert trigger["type"] == "redis"
    config = k8s[("ConfigMap", "boneage-config")]["data"]
    prefix = config.get("BONEAGE_BROKER_PREFIX", "")
    assert trigger["metadata"]["listName"] == prefix + INFERENCE_QUEUE
    broker = config["BONEAGE_BROKER_URL"].removeprefix("redis://").split("/")
    assert trigger["metadata"]["address"] == broker[0]
    assert trigger["metadata"]["databaseIndex"] == (broker[1] if len(broker) > 1 else "0")
    assert int(trigger["metadata"]["listLength"]) >= 1


def test_kubectl_kustomize_renders_everything(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == set(k8s)
    images = set()
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "boneage-worker"
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            images.add(container["image"])
    # every container, the init container too, runs this release's build
    assert images == {f"boneage-worker:{_version()}-{flavour}" for flavour in IMAGES}


# -- systemd ------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> keys -> every value (keys such as After= may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}: {line}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line} outside a section"
        assert not line.endswith("\\"), f"{path.name}: keep directives on one line"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


SERVICES = {
    "boneage-listener.service": ["listen"],
    "boneage-worker-inference@.service": ["work", "-Q", INFERENCE_QUEUE],
    "boneage-worker-delivery.service": ["work", "-Q", DELIVERY_QUEUE],
}


def test_systemd_files_present() -> None:
    assert {p.name for p in SYSTEMD.iterdir()} == {
        *SERVICES,
        "boneage.target",
        "boneage.env.example",
    }


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_systemd_service(name: str) -> None:
    unit = _unit(SYSTEMD / name)
    assert {"Unit", "Service", "Install"} <= set(unit)
    service = unit["Service"]
    assert service["User"] == ["boneage"]
    assert service["EnvironmentFile"] == ["/etc/boneage/boneage.env"]
    assert service["Restart"] == ["on-failure"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": DATA_DIR,
        "PrivateTmp": "yes",
    }.items():
        assert service[key] == [value], f"{name}: {key}={value}"
    assert unit["Unit"]["PartOf"] == ["boneage.target"]
    assert unit["Install"]["WantedBy"] == ["boneage.target"]

    (start,) = service["ExecStart"]
    argv = start.replace("%i", "0").split()
    assert argv[0] == BINARY
    context = _check_cli(argv[1:])
    assert argv[1 : 1 + len(SERVICES[name])] == SERVICES[name]
    for pre in service.get("ExecStartPre", []):
        pre_argv = pre.split()
        assert pre_argv[0] == BINARY
        _check_cli(pre_argv[1:])
    for assignment in service.get("Environment", []):
        variable, _, value = assignment.partition("=")
        _settings_from_env({variable: value.replace("%i", "0")})

    if name == "boneage-listener.service":
        assert service["ExecStartPre"] == [f"{BINARY} db upgrade"]
    if name == "boneage-worker-inference@.service":
        assert context.params["pool"] == "threads"
        assert context.params["device"] == "cuda:0"
        assert service["Environment"] == ["BONEAGE_DEVICE=cuda:%i"]
        assert "PrivateDevices" not in service  # the GPU is a device
        assert "ProtectClock" not in service  # implies DeviceAllow=, closing /dev/nvidia*


def test_systemd_inference_unit_shows_a_cpu_drop_in_that_runs_a_process_per_core() -> None:
    """The unit's comment for machines without a GPU: its ExecStart runs the CPU layout
    (one prefork process per core, the README's), not `--pool threads`, whose task
    threads would each run a forward pass on every core."""
    text = (SYSTEMD / "boneage-worker-inference@.service").read_text()
    drop_in = [
        line.lstrip("#").strip()
        for line in text.splitlines()
        if line.startswith("#") and "=" in line and line.lstrip("#").strip()[:1].isupper()
    ]
    assert "[Service]" in [line.lstrip("#").strip() for line in text.splitlines()]
    assert "Environment=BONEAGE_DEVICE=cpu" in drop_in
    assert "ExecStart=" in drop_in  # clears the unit's own before setting another
    (start,) = [line for line in drop_in if line.startswith(f"ExecStart={BINARY} ")]
    argv = start.removeprefix("ExecStart=").split()
    context = _check_cli(argv[1:])
    assert argv[1:4] == ["work", "-Q", INFERENCE_QUEUE]
    assert context.params["pool"] is None and context.params["device"] is None
    assert "--pool threads" not in start


def test_systemd_target_pulls_in_the_services() -> None:
    target = _unit(SYSTEMD / "boneage.target")
    assert target["Install"]["WantedBy"] == ["multi-user.target"]
    wanted = " ".join(target["Unit"]["Wants"]).split()
    assert wanted
    for unit in wanted:
        template = re.sub(r"@[^.]+\.", "@.", unit)
        assert (SYSTEMD / template).is_file(), unit
    assert {re.sub(r"@[^.]+\.", "@.", u) for u in wanted} == set(SERVICES)


def test_systemd_environment_file_example() -> None:
    env = {}
    for raw in (SYSTEMD / "boneage.env.example").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        variable, sep, value = line.partition("=")
        assert sep and variable == variable.strip() and not value.startswith(("'", '"')), line
        env[variable] = value
    settings = _settings_from_env(env)
    assert str(settings.data_dir) == DATA_DIR
    assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://")
    assert settings.broker_url and settings.broker_url.startswith("redis://")
    assert settings.destinations and settings.allowed_aets
    assert "BONEAGE_DEVICE" not in env  # the inference units set it per GPU


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The units name the production path; verify checks that it is executable.
    binary = Path(sys.executable).with_name("boneage-worker")
    assert binary.is_file(), f"{binary}: the project is not installed in this environment"
    for source in SYSTEMD.glob("*"):
        if source.suffix in {".service", ".target"}:
            text = source.read_text().replace(BINARY, str(binary))
            (tmp_path / source.name).write_text(text)
    units = sorted(str(p) for p in tmp_path.iterdir())
    result = subprocess.run(
        [analyze, "verify", "--man=no", *units], capture_output=True, text=True, timeout=120
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and "Failed to" in output and "manager" in output.lower():
        pytest.skip(f"systemd-analyze cannot run here: {output.splitlines()[0]}")
    assert result.returncode == 0, output
    assert output == "", output  # unknown keys and bad values are only warnings


# -- stopping -----------------------------------------------------------------------

#: What a supervisor needs after its grace: to kill what is left and exit.
STOP_MARGIN_SECONDS = 10


def _seconds(duration: str | int) -> float:
    """A Compose or systemd duration ("2m", "120s", "1min 30s", 90) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*([a-z]*)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == re.sub(r"\s", "", str(duration))
    return sum(int(number) * units[unit] for number, unit in parts)


def _stops_slowly(args: list[str]) -> bool:
    """Whether a command runs Celery workers, whose warm shutdown finishes the tasks in
    hand, or a supervisor of them (serve; a GPU worker's batching processes)."""
    return _check_cli(args).command.name in {"work", "serve"}


def test_workers_are_given_longer_to_stop_than_the_supervisors_grace(
    compose: dict[str, Any], k8s: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """A supervisor kills its children STOP_GRACE_SECONDS after SIGTERM; the service
    manager must wait longer, or it kills them all mid-image first (Docker's 10 s
    default included)."""
    from worker.cli import STOP_GRACE_SECONDS

    enough = STOP_GRACE_SECONDS + STOP_MARGIN_SECONDS
    checked = []
    for name in BONEAGE_SERVICES:
        service = compose["services"][name]
        if _stops_slowly(_interpolate(service["command"])):
            assert _seconds(service.get("stop_grace_period", "10s")) >= enough, name
            checked.append(name)
    for name, pod in _pod_specs(k8s).items():
        (container,) = pod["containers"]
        if _stops_slowly(container["args"]):
            assert pod.get("terminationGracePeriodSeconds", 30) >= enough, name
            checked.append(name)
    for name in SERVICES:
        service = _unit(SYSTEMD / name)["Service"]
        (start,) = service["ExecStart"]
        if _stops_slowly(start.replace("%i", "0").split()[1:]):
            (timeout,) = service.get("TimeoutStopSec", ["90s"])
            assert _seconds(timeout) >= enough, name
            checked.append(name)
    for flavour, path in DOCKERFILES.items():
        # a Dockerfile cannot set the stop timeout: its comment shows `docker run` with it
        (cmd,) = [json.loads(args) for op, args in _instructions(path) if op == "CMD"]
        assert _stops_slowly(cmd), flavour
        timeouts = re.findall(r"docker run --stop-timeout (\d+)", path.read_text())
        assert timeouts and all(int(t) >= enough for t in timeouts), flavour
        checked.append(flavour)
    assert len(checked) == 8  # two Compose workers, two pods, two units, two images


def test_systemd_signals_only_a_workers_main_process_to_stop() -> None:
    """systemd's default KillMode (control-group) sends SIGTERM to every process of the
    unit at once. Celery's prefork children reset SIGTERM to its default action
    (celery.concurrency.prefork.WORKER_SIGRESET) and die at it, mid-image; a GPU
    worker's batching processes would stop beside their supervisor, not under it. With
    KillMode=mixed only the main process gets SIGTERM and stops its children after
    they finish; SIGKILL goes to whatever is left once it exits (or TimeoutStopSec
    passes). The listener is one process (its threads only): the default suits it."""
    from celery.concurrency.prefork import WORKER_SIGRESET

    assert "SIGTERM" in WORKER_SIGRESET  # what makes the default kill mode kill images
    units = {}
    for name in SERVICES:
        service = _unit(SYSTEMD / name)["Service"]
        (start,) = service["ExecStart"]
        units[name] = service.get("KillMode", ["control-group"])
        if _stops_slowly(start.replace("%i", "0").split()[1:]):
            assert units[name] == ["mixed"], name
    assert units == {
        "boneage-listener.service": ["control-group"],
        "boneage-worker-inference@.service": ["mixed"],
        "boneage-worker-delivery.service": ["mixed"],
    }


def test_kubernetes_workers_are_restarted_when_a_task_hangs(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """A hung worker still heartbeats; `liveness` (local files, no database, no broker)
    is what the kubelet restarts it on."""
    for name, pod in _pod_specs(k8s).items():
        (container,) = pod["containers"]
        if _check_cli(container["args"]).command.name != "work":
            assert "livenessProbe" not in container or name == "boneage-listener", name
            continue
        probe = container["livenessProbe"]
        command = probe["exec"]["command"]
        assert command[0] == "boneage-worker", name
        assert _check_cli(command[1:]).command.name == "liveness", name
        assert probe["timeoutSeconds"] >= 10, f"{name}: a Python start on a busy node"
        # it reads the pod's own /tmp, where the worker's processes note their tasks
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], name
