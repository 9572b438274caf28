"""`status` where the database is not the one it should read: none there (run in the
wrong directory), one older than this version (not migrated yet), one newer (an image
rolled back after a newer one migrated it). It creates nothing, and says which."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from db.engine import DatabaseNotReady, check_schema, get_engine, head_revision, upgrade
from worker.settings import load_settings
from worker.status import collect

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'boneage.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def test_status_where_there_is_no_database_creates_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An embedded install's status run from another directory (BONEAGE_DATA_DIR unset:
    ``./var/boneage``) made an empty database there, then sent the administrator to
    `db upgrade` it."""
    for name in ("BONEAGE_DATA_DIR", "BONEAGE_DATABASE_URL", "BONEAGE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.data_dir == Path.cwd() / "var" / "boneage"  # the default, made absolute
    report = collect(settings)
    database = Path.cwd() / "var" / "boneage" / "boneage.db"
    assert report["problems"] == [
        f"database: no database at {database} (is BONEAGE_DATA_DIR right?); on a new "
        "node, where it is, 'boneage-worker db upgrade' creates it"
    ]
    assert report["healthy"] is False
    assert _files(tmp_path) == []


def test_the_status_command_where_there_is_no_node_makes_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command, not only its report: it made the embedded broker's file (and its
    folder) where it looked, so that a later `db upgrade` there started a second node."""
    from click.testing import CliRunner

    from worker.cli import main as cli

    for name in ("BONEAGE_DATA_DIR", "BONEAGE_DATABASE_URL", "BONEAGE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("BONEAGE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(cli, ["status", "--quiet"])
    assert shown.exit_code == 1, shown.output
    assert "no database at" in shown.output
    assert _files(tmp_path) == []


def test_a_schema_newer_than_this_version_is_told_from_an_older_one(database_url: str) -> None:
    upgrade(database_url, "0009")
    with pytest.raises(DatabaseNotReady) as older:
        check_schema(database_url)
    assert str(older.value) == (
        f"database schema is at 0009, older than this version needs ({head_revision()}): "
        "run 'boneage-worker db upgrade'"
    )

    upgrade(database_url)
    check_schema(database_url)
    # as a newer version leaves it: at a revision this one has no migration for
    with get_engine(database_url).begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(DatabaseNotReady) as newer:
        check_schema(database_url)
    assert str(newer.value) == (
        "database schema is at 0099, newer than this version of boneage-worker (which "
        f"knows up to {head_revision()}): run the version that migrated it"
    )
    assert "db upgrade" not in str(newer.value)  # it would not help
