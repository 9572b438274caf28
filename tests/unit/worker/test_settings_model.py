"""BONEAGE_MODEL: an empty value is an error wherever it is read; a path that names no
readable file is refused by the commands that load the model (`work` for the inference
queue, `serve`), through :meth:`Settings.check_model_file`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def _no_boneage_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BONEAGE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_model_variable_is_an_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    # read as a path it would be ".", a directory, and every worker would fail to start
    monkeypatch.setenv("BONEAGE_MODEL", value)
    with pytest.raises(ValidationError, match="BONEAGE_MODEL is empty"):
        load_settings()


def test_an_empty_model_in_the_settings_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "boneage.toml"
    config.write_text('[boneage]\nmodel = ""\n')
    # as --config does, but taken away after the test (load_settings(FILE) would not)
    monkeypatch.setenv("BONEAGE_CONFIG", str(config))
    with pytest.raises(ValidationError, match="BONEAGE_MODEL is empty"):
        load_settings()


def test_no_model_is_the_untrained_one() -> None:
    settings = load_settings()
    assert settings.model is None
    settings.check_model_file()  # nothing to check


def test_the_model_file_is_not_looked_for_when_the_settings_are_read(tmp_path: Path) -> None:
    """The listener, the delivery workers and `status` read the same settings without
    the model's volume (a Kubernetes ConfigMap shared by every pod)."""
    missing = tmp_path / "boneage-r50.safetensors"
    assert load_settings(model=missing).model == missing


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: None, "{path} does not exist"),
        (lambda path: path.mkdir(), "{path} is not a file (a .safetensors checkpoint)"),
    ],
    ids=["missing", "directory"],
)
def test_a_model_that_names_no_file_is_refused_in_one_line(
    tmp_path: Path, make: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / "boneage-r50.safetensros"
    make(path)
    settings = Settings(model=path)
    with pytest.raises(ValueError) as refused:
        settings.check_model_file()
    text = str(refused.value)
    assert text == "BONEAGE_MODEL " + message.format(path=path)
    assert "\n" not in text


def test_a_model_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "boneage-r50.safetensors"
    path.write_bytes(b"not read here: loading it is the worker's")
    Settings(model=path).check_model_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_model_file_this_user_cannot_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "boneage-r50.safetensors"
    path.write_bytes(b"")
    path.chmod(0)
    with pytest.raises(ValueError, match=re.escape(f"{path} cannot be read by this user")):
        Settings(model=path).check_model_file()
