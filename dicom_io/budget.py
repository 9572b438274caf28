"""A data set's header read within a budget, so that a few megabytes sent cannot take
memory without bound.

pydicom builds every item of a sequence of undefined length it meets, even in a
sequence it was asked to leave out (``specific_tags`` skips values of a defined length
only), and keeps every element it reads: an empty item, 8 bytes in the file, takes some
700 bytes of memory. A data set of 8 MB whose header held a million of them took the
listener from 58 MiB to 720 MiB. The readers (the listener's header, the worker's
:func:`dicom_io.pixels.read_image`) have pydicom read through a :class:`BudgetedFile`,
which counts what is read, and refuse the data set (:class:`HeaderTooLargeError`) once
it passes their budget: reads of the file (an element or an item takes one to four)
and bytes. What pydicom skips (values left in the file) costs nothing; the Pixel Data
value is left out of the count where the reader says so
(:meth:`BudgetedFile.beside_pixel_data`).
"""

from __future__ import annotations

from typing import Any, BinaryIO

from pydicom.tag import BaseTag

# Pixel Data, Float Pixel Data, Double Float Pixel Data (PS3.6 7FE0).
_PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


class HeaderTooLargeError(ValueError):
    """A data set holds more besides its pixels than any image's header: more elements
    and sequence items, or more bytes, than its reader's budget (a bomb, or no image)."""


class BudgetedFile:
    """``fh`` for pydicom to read, within ``max_reads`` reads and ``max_bytes`` bytes.

    Past either it raises :class:`HeaderTooLargeError` (pydicom may wrap it in an
    ``OSError``: :func:`over_budget` finds it), and reads nothing more: a read that would
    take it past ``max_bytes`` is refused before it is made.
    """

    def __init__(self, fh: BinaryIO, *, max_reads: int, max_bytes: int) -> None:
        self._fh = fh
        # FileDataset takes the file's name (and its modification time) from here
        self.name: Any = getattr(fh, "name", None)
        self.max_reads, self.max_bytes = max_reads, max_bytes
        self.reads = self.bytes = 0
        self.counting = True

    @property
    def closed(self) -> bool:
        return bool(getattr(self._fh, "closed", False))

    def read(self, size: int = -1) -> bytes:
        if not self.counting:
            return self._fh.read(size)
        self.reads += 1
        room = self.max_bytes - self.bytes
        if self.reads > self.max_reads:
            raise HeaderTooLargeError(
                f"its header holds more elements and sequence items than {self.max_reads} "
                "reads take"
            )
        if size > room:
            raise self._over_bytes()
        data = self._fh.read(room + 1 if size < 0 else size)
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            raise self._over_bytes()
        return data

    def _over_bytes(self) -> HeaderTooLargeError:
        return HeaderTooLargeError(
            f"its header holds more than {self.max_bytes >> 20} MiB besides its pixel data"
        )

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def beside_pixel_data(self, tag: BaseTag, _vr: str | None, _length: int) -> bool:
        """A ``stop_when`` for :func:`pydicom.filereader.read_partial` that stops at
        nothing and leaves the value of a top-level Pixel Data element (read whole where
        it is small or encapsulated) out of the count: pydicom calls it before it reads
        each top-level element's value."""
        self.counting = tag not in _PIXEL_DATA_TAGS
        return False


def over_budget(exc: BaseException) -> HeaderTooLargeError | None:
    """The :class:`HeaderTooLargeError` ``exc`` is, or was raised from or while
    handling (pydicom raises an ``OSError`` for any error reading a sequence item)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, HeaderTooLargeError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
