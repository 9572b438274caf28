"""Text as a file stores it: pydicom decodes each text element in the data set's Specific
Character Set, each byte invalid there as U+FFFD, and encodes what it decoded when it
writes the data set in another encoding. A Patient ID received in bytes its character
set does not allow, which the SR and SC copy as received (`dicom_io.sr`), would reach
the PACS as another Patient ID. What lost characters is kept as its bytes."""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

#: The VRs whose text is in the Specific Character Set (PS3.5 6.1.2.3), which pydicom
#: decodes from it: the others are in the default repertoire.
CHARACTER_SET_VRS = frozenset(("LO", "LT", "PN", "SH", "ST", "UC", "UT"))
#: What pydicom puts in decoded text for each byte invalid in its character set.
REPLACEMENT = "\ufffd"


def lost_text(element: DataElement | RawDataElement) -> bool:
    """Whether ``element``'s decoded text, or that of any element in its items, lost
    characters in decoding: holds U+FFFD. (Text whose bytes encode U+FFFD itself is
    kept as stored too: the same bytes.) An element in an item that nothing has
    read yet is still its bytes, and lost nothing: it is not decoded here (a damaged
    one, a length wrong for its VR, would raise)."""
    if isinstance(element, RawDataElement):
        return False
    if element.VR == "SQ":
        return any(
            lost_text(item.get_item(tag))
            for item in element.value or []
            for tag in sorted(item.keys())
        )
    if element.VR not in CHARACTER_SET_VRS:
        return False
    value = element.value
    values = value if isinstance(value, (list, MultiValue)) else [value]
    return any(isinstance(one, str | PersonName) and REPLACEMENT in str(one) for one in values)


def read_keeping_text(path: Path) -> Dataset:
    """The data set of the Part 10 file at ``path``, read in full, each text element
    whose decoded value lost characters (:func:`lost_text`), in sequence items too,
    kept as the bytes the file holds: encoded in another transfer syntax (Implicit for
    Explicit VR Little Endian, the same bytes in each value), it keeps every value the
    file holds. Raises what :func:`pydicom.dcmread` and decoding raise for a file that
    does not parse."""
    ds = dcmread(path)
    _keep_stored_text(ds)
    return ds


def _keep_stored_text(ds: Dataset) -> None:
    for tag in list(ds.keys()):
        stored = ds.get_item(tag)
        element = ds[tag]  # decoded now, in the character set that applies to it
        if element.VR == "SQ":
            for item in element.value or []:
                _keep_stored_text(item)
        elif (
            isinstance(stored, RawDataElement)
            and isinstance(stored.value, bytes)
            and lost_text(element)
        ):
            ds[tag] = DataElement(tag, element.VR, stored.value)
