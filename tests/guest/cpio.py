"""Writer of "newc" cpio archives, the format the Linux initramfs unpacker reads.

Each entry is a 110-byte ASCII header ("070701" and 13 eight-digit hex
fields), the NUL-terminated name and the data, with the name and the data each
padded to a multiple of 4 bytes. A "TRAILER!!!" entry ends the archive (see
the Linux document "initramfs buffer format"). The archive is built in memory
and is reproducible: every mtime is 0 and the inode numbers count up from 1 in
the order of the entries.
"""

from __future__ import annotations

import stat

__all__ = ["CpioWriter"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """An in-memory newc archive; add entries, then call ``finish``."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._next_inode = 1
        self._names: set[str] = set()

    def add_directory(self, name: str, mode: int = 0o755) -> None:
        self._add(name, stat.S_IFDIR | mode, b"", nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._add(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, mode: int) -> None:
        self._add(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        """Append the trailer and return the whole archive."""
        self._add(_TRAILER, 0, b"", nlink=1, inode=0)
        return b"".join(self._chunks)

    def _add(
        self,
        name: str,
        mode: int,
        data: bytes,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        inode: int | None = None,
    ) -> None:
        name = name.lstrip("/")
        if not name:
            raise ValueError("cpio entry name is empty")
        if name in self._names:
            raise ValueError(f"cpio entry {name!r} was already added")
        self._names.add(name)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
        encoded_name = name.encode() + b"\0"
        fields = (
            inode,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime
            len(data),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(encoded_name),
            0,  # checksum, unused by newc
        )
        header = _MAGIC + b"".join(b"%08x" % field for field in fields)
        self._chunks.append(header + encoded_name + _pad4(len(header + encoded_name)))
        self._chunks.append(data + _pad4(len(data)))
