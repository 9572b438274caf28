"""The UIDs of our objects: the node's, valid, the same every time, and as they were for
objects made before the node's identity went into them."""

from __future__ import annotations

import re
import uuid

import pytest
from pydantic import ValidationError
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from dicom_io.uids import (
    LEGACY_ROOT,
    MAX_ROOT_LENGTH,
    MIN_HASH_DIGITS,
    UUID_ROOT,
    UidScheme,
    check_uid_root,
    derived_from,
    hashed_uid,
    is_valid_uid,
    root_of,
)
from worker.settings import load_settings

#: A model's SHA-256, as the pipeline puts it into an SR's UID.
MODEL = "0123456789abcdef" * 4
#: The SR of image 1.2.3.4 by MODEL, as the pipeline derived its UID before.
SR_BEFORE = "1.2.826.0.1.3680043.8.498.11452233345172268985902151516173381353"
#: What the pipeline derived before (pydicom's generate_uid(entropy_srcs=...), written
#: down from the code of then) for that SR, its series, the note withdrawing it and its
#: tracking identifier: a change to pydicom or to our code that moves them is seen.
BEFORE = {
    ("1.2.3.4", MODEL, "sr"): SR_BEFORE,
    ("1.2.3.4", MODEL, "sr-series"): (
        "1.2.826.0.1.3680043.8.498.11264208176811017220263403180288491210"
    ),
    (SR_BEFORE, "withdrawn-ko"): "1.2.826.0.1.3680043.8.498.12245782191744889832208638301432867158",
    (SR_BEFORE, "tracking", "Bone age assessment"): (
        "1.2.826.0.1.3680043.8.498.39821949702062180058608206927438539256"
    ),
}
ORGANISATION = "1.2.840.99999.1.2.3"


def valid(uid: str) -> bool:
    """A UID as PS3.5 has it, checked here by other means than the module's."""
    return len(uid) <= 64 and all(
        part.isdigit() and (part == "0" or not part.startswith("0")) for part in uid.split(".")
    )


def test_the_legacy_root_is_pydicoms() -> None:
    assert LEGACY_ROOT + "." == PYDICOM_ROOT_UID


@pytest.mark.parametrize("parts", list(BEFORE))
def test_an_image_of_before_keeps_its_uids_exactly(parts: tuple[str, ...]) -> None:
    if parts[1] in ("withdrawn-ko", "tracking"):  # derived from an object of ours
        made = derived_from(parts[0], *parts[1:])
    else:
        made = UidScheme(LEGACY_ROOT, "any node").derive(*parts)
    assert made == BEFORE[parts] == str(generate_uid(entropy_srcs=list(parts)))


def test_a_node_derives_the_same_uid_every_time_and_another_node_another() -> None:
    node, other = UidScheme(UUID_ROOT, "node A"), UidScheme(UUID_ROOT, "node B")
    parts = ("1.2.3.4", MODEL, "sr")
    assert node.derive(*parts) == UidScheme(UUID_ROOT, "node A").derive(*parts)
    assert node.derive(*parts) != other.derive(*parts)
    # written down: the same on every host and Python, release after release
    assert node.derive(*parts) == "2.25.103160684135298408800421633832307171458"


def test_a_uid_under_2_25_is_the_integer_of_a_version_8_uuid() -> None:
    for n in range(200):
        uid = UidScheme(UUID_ROOT, "node A").derive("1.2.3.4", str(n))
        assert uid.startswith("2.25.") and valid(uid) and is_valid_uid(uid), uid
        made = uuid.UUID(int=int(uid.removeprefix("2.25.")))
        assert (made.version, made.variant) == (8, uuid.RFC_4122)


def test_parts_are_hashed_apart_where_pydicom_joined_them() -> None:
    node = UidScheme(UUID_ROOT, "node A")
    assert node.derive("1.2.3", "4x") != node.derive("1.2.34", "x")
    assert node.derive("a", "b") != node.derive("ab")
    # as it was: the same UID (kept for the objects made so)
    legacy = UidScheme(LEGACY_ROOT, "node A")
    assert legacy.derive("1.2.3", "4x") == legacy.derive("1.2.34", "x")


@pytest.mark.parametrize(
    "root", ["1.2", ORGANISATION, "2.16.840.1.113883.3.9999", "1." + "2" * (MAX_ROOT_LENGTH - 2)]
)
def test_a_uid_under_an_organisations_root_fits(root: str) -> None:
    uids = {UidScheme(root, "node A").derive("1.2.3.4", str(n)) for n in range(200)}
    assert len(uids) == 200
    for uid in uids:
        assert uid.startswith(root + ".") and valid(uid) and root_of(uid) == root, uid
        assert len(uid.removeprefix(root + ".")) >= 20  # its hash's digits


def test_a_uid_derived_from_one_of_ours_is_under_its_root() -> None:
    node = UidScheme(UUID_ROOT, "node A")
    ours = node.derive("1.2.3.4", MODEL, "sr")
    assert root_of(derived_from(ours, "withdrawn-ko")) == UUID_ROOT
    assert derived_from(ours, "withdrawn-ko") != derived_from(
        UidScheme(UUID_ROOT, "node B").derive("1.2.3.4", MODEL, "sr"), "withdrawn-ko"
    )
    under = UidScheme(ORGANISATION, "node A").derive("1.2.3.4", MODEL, "sr")
    assert derived_from(under, "withdrawn-ko").startswith(ORGANISATION + ".")
    assert valid(derived_from(under, "withdrawn-ko"))


@pytest.mark.parametrize(
    ("value", "root"),
    [("1.2.840.99999", "1.2.840.99999"), (" 1.2.840.99999. ", "1.2.840.99999"), ("0.9", "0.9")],
)
def test_an_organisations_root_is_taken(value: str, root: str) -> None:
    assert check_uid_root(value) == root
    assert load_settings(uid_root=value).uid_root == root


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "is empty"),
        ("1.02.3", "is not a UID root"),
        ("1.2.abc", "is not a UID root"),
        ("1..2", "is not a UID root"),
        ("12345", "is not a UID root"),
        ("3.1.2", "is not a UID root"),
        ("12.1.2", "is not a UID root"),
        ("1." + "2" * (MAX_ROOT_LENGTH - 1), f"at most {MAX_ROOT_LENGTH}"),
        ("2.25", "UIDs made of UUIDs"),
        ("2.25.1234", "UIDs made of UUIDs"),
        ("1.2.826.0.1.3680043.8.498", "pydicom's"),
        ("1.2.826.0.1.3680043.8.498.7", "pydicom's"),
    ],
)
def test_a_bad_organisation_root_is_refused_at_start_up(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_uid_root(value)
    with pytest.raises(ValidationError, match=r"BONEAGE_UID_ROOT .*" + re.escape(message)):
        load_settings(uid_root=value)


def test_the_root_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().uid_root is None
    monkeypatch.setenv("BONEAGE_UID_ROOT", ORGANISATION)
    assert load_settings().uid_root == ORGANISATION
    monkeypatch.setenv("BONEAGE_UID_ROOT", "1.2.3.04")
    with pytest.raises(ValidationError, match=re.escape("BONEAGE_UID_ROOT '1.2.3.04' is not")):
        load_settings()


def test_hashed_uid_under_a_short_root_keeps_to_128_bits() -> None:
    uid = hashed_uid("1.2", "x")
    assert len(uid.removeprefix("1.2.")) <= 39 and valid(uid)


def test_a_hash_whose_remainder_has_leading_zeros_is_written_shorter() -> None:
    """Under the longest root the hash is reduced to 24 digits, written as a number: about
    one UID in ten has fewer, none a leading zero (PS3.5 9.1); each is one of 10**24
    values all the same, about 80 bits."""
    root = "1." + "2" * (MAX_ROOT_LENGTH - 2)
    tails = [
        UidScheme(root, "node A").derive("1.2.3.4", str(n)).removeprefix(root + ".")
        for n in range(1000)
    ]
    assert all(len(tail) <= MIN_HASH_DIGITS and tail[0] != "0" for tail in tails)
    shorter = sum(len(tail) < MIN_HASH_DIGITS for tail in tails)
    assert 50 <= shorter <= 170, shorter  # about a tenth: 100 expected
