"""The UIDs of the objects we make, derived rather than drawn at random.

An object's UIDs are derived from what it is of (the source image, the model, the
assessment, ...) so that an attempt made again (a retry after a crash, a message
delivered twice) makes the same object under the same UIDs, which the database's unique
keys and the PACS then take for one. They are derived with the node's identity too (a
random value every process of the node shares, :class:`UidScheme`): another node
assessing the same image with the same model (a validation node beside production,
another site, the same site reinstalled) makes other objects, under other UIDs.

A UID is ``2.25.`` and the integer of a UUID (PS3.5 B.2, ITU-T X.667): version 8, its
bits 128 of a SHA-256 of the parts, which are joined unambiguously (as a JSON list).
Under an organisation's own root (BONEAGE_UID_ROOT), it is that root and the hash's
128 bits reduced modulo ``10**d``, ``d`` the digits that fit in 64 characters (at least
:data:`MIN_HASH_DIGITS`, about 80 bits), written as a number: without leading zeros, so
about one UID in ten has fewer than ``d`` digits after the root, one in a hundred at
least two fewer, and so on (the hash still takes one of ``10**d`` values).

Before, every UID was pydicom's ``generate_uid(entropy_srcs=parts)``: under pydicom's
root, the parts joined with no separator, and no node in them (:data:`LEGACY_ROOT`).
The objects made so are at the PACS under those UIDs: what is derived again of them (a
later assessment's series, the note withdrawing one) is derived as it was
(:func:`derived_from`, :meth:`UidScheme.derive`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

#: The root of UIDs made of a UUID (PS3.5 B.2).
UUID_ROOT = "2.25"
#: pydicom's root (``pydicom.uid.PYDICOM_ROOT_UID``, without its final dot), which every
#: UID of ours was made under before the node's identity went into them.
LEGACY_ROOT = "1.2.826.0.1.3680043.8.498"
#: PS3.5 6.2: a UID is at most 64 characters.
MAX_UID_LENGTH = 64
#: The fewest digits ``d`` the hash is reduced to (modulo ``10**d``) under an
#: organisation's root: about 80 bits, so that two of the node's objects never share a
#: UID. Written as a number, without leading zeros, the last component may be shorter.
MIN_HASH_DIGITS = 24
#: The longest organisation root that leaves room for :data:`MIN_HASH_DIGITS` within 64
#: characters.
MAX_ROOT_LENGTH = MAX_UID_LENGTH - 1 - MIN_HASH_DIGITS
#: The digits of a 128-bit integer, the most a UID under an organisation's root takes.
_MAX_HASH_DIGITS = 39

_COMPONENT = r"(0|[1-9][0-9]*)"
_UID = re.compile(rf"{_COMPONENT}(\.{_COMPONENT})*")


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` is a UID as PS3.5 9.1 has it: digits and dots, no component
    with a leading zero, at most 64 characters."""
    return len(uid) <= MAX_UID_LENGTH and _UID.fullmatch(uid) is not None


def check_uid_root(value: str) -> str:
    """An organisation's UID root (BONEAGE_UID_ROOT), checked; returned without a final dot.

    Raises
    ------
    ValueError
        A sentence naming what is wrong: not a UID, too long to leave room for the hash
        digits, or a root that is not the organisation's (2.25, pydicom's).
    """
    root = value.strip().removesuffix(".")
    if not root:
        raise ValueError(
            "BONEAGE_UID_ROOT is empty: set it to your organisation's UID root, or leave it "
            "unset for UIDs made of UUIDs (2.25)"
        )
    if _UID.fullmatch(root) is None or "." not in root or root.split(".")[0] not in ("0", "1", "2"):
        raise ValueError(
            f"BONEAGE_UID_ROOT {value!r} is not a UID root: numbers separated by dots (at "
            "least two, the first 0, 1 or 2), none with a leading zero, such as 1.2.840.99999"
        )
    if len(root) > MAX_ROOT_LENGTH:
        raise ValueError(
            f"BONEAGE_UID_ROOT {value!r} has {len(root)} characters: at most "
            f"{MAX_ROOT_LENGTH}, so that a UID under it leaves room for {MIN_HASH_DIGITS} "
            f"digits of its hash within {MAX_UID_LENGTH} characters"
        )
    for theirs, whose in ((UUID_ROOT, "UIDs made of UUIDs"), (LEGACY_ROOT, "pydicom's")):
        if root == theirs or root.startswith(theirs + "."):
            raise ValueError(
                f"BONEAGE_UID_ROOT {value!r} is under {theirs}, {whose} root, not your "
                "organisation's: leave BONEAGE_UID_ROOT unset for UIDs made of UUIDs (2.25)"
            )
    return root


def root_of(uid: str) -> str:
    """The root a UID of ours was made under: :data:`LEGACY_ROOT`, :data:`UUID_ROOT`, or
    the organisation's (all of it but its last component, the hash's digits)."""
    for root in (LEGACY_ROOT, UUID_ROOT):
        if uid.startswith(root + "."):
            return root
    return uid.rpartition(".")[0]


def hashed_uid(root: str, *parts: str) -> str:
    """A UID under ``root`` that is the same every time for the same ``parts``, and
    another for other parts; ``root`` is :data:`UUID_ROOT` or one :func:`check_uid_root`
    accepted."""
    # a JSON list: ("1.2.3", "4x") and ("1.2.34", "x") are other parts, hashed apart
    digest = hashlib.sha256(json.dumps(list(parts)).encode()).digest()
    value = int.from_bytes(digest[:16], "big")
    if root == UUID_ROOT:
        # the integer of a UUID (RFC 9562 version 8: its 122 other bits are the hash's)
        value = (value & ~(0xF << 76)) | (0x8 << 76)
        value = (value & ~(0x3 << 62)) | (0x2 << 62)
        return f"{UUID_ROOT}.{value}"
    digits = min(_MAX_HASH_DIGITS, MAX_UID_LENGTH - 1 - len(root))
    # at most ``digits`` digits, fewer where the remainder has leading zeros (a component
    # has none, PS3.5 9.1): the same 10**digits values, about 80 bits at the least
    return f"{root}.{value % 10**digits}"


def legacy_uid(*parts: str) -> str:
    """A UID as every one of ours was derived before the node's identity went into them:
    ``pydicom.uid.generate_uid(entropy_srcs=parts)``."""
    from pydicom.uid import generate_uid  # pydicom is not loaded where this is not used

    return str(generate_uid(prefix=LEGACY_ROOT + ".", entropy_srcs=list(parts)))


def derived_from(uid: str, *parts: str) -> str:
    """A UID derived from ``uid``, one of ours, and ``parts``, under the root ``uid`` was
    made under (:func:`root_of`): of a UID of the node's, it is the node's too; of one
    made before the node's identity went into them, as it was derived then."""
    root = root_of(uid)
    if root == LEGACY_ROOT:
        return legacy_uid(uid, *parts)
    return hashed_uid(root, uid, *parts)


@dataclasses.dataclass(frozen=True)
class UidScheme:
    """How the UIDs of one image's objects are derived: under ``root``, with the node's
    ``identity`` (which :data:`LEGACY_ROOT` leaves out, as it did)."""

    root: str
    identity: str

    def derive(self, *parts: str) -> str:
        """The UID of the object that ``parts`` name: the same every time on this node,
        another on another node."""
        if self.root == LEGACY_ROOT:
            return legacy_uid(*parts)
        return hashed_uid(self.root, self.identity, *parts)


#: How every UID of ours was derived before the node's identity went into them (no
#: identity in them): that of an object recorded before revision 0006, whose series
#: was not recorded, derived again.
LEGACY_UIDS = UidScheme(LEGACY_ROOT, "")
