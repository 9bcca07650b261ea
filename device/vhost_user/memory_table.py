"""The front-end's memory table: regions mapped from its file descriptors.

Each region of SET_MEM_TABLE or ADD_MEM_REG comes with a descriptor (a memfd
or hugetlbfs file of the front-end) that the back-end maps with MAP_SHARED at
``mmap_offset``. The mapped regions become a ``virtio.memory.GuestMemory``
whose regions carry both the guest-physical address and the front-end's user
address, so ring addresses of SET_VRING_ADDR (user addresses) can be
translated to guest-physical ones.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Sequence

from virtio.memory import GuestMemory, MemoryRegion

from .errors import MemoryTableError
from .protocol import VhostMemoryRegion, check_regions

__all__ = ["MappedRegion", "MemoryTable"]

logger = logging.getLogger(__name__)


class MappedRegion:
    """One region of the table and its shared mapping."""

    def __init__(self, request: str, description: VhostMemoryRegion, fd: int) -> None:
        self.description = description
        # mmap offsets must be page aligned, so map from the page that contains
        # mmap_offset and skip the bytes before it.
        delta = description.mmap_offset % mmap.ALLOCATIONGRANULARITY
        try:
            self._mmap = mmap.mmap(
                fd,
                description.memory_size + delta,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=description.mmap_offset - delta,
            )
        except (OSError, ValueError, OverflowError) as error:
            # Python's mmap raises ValueError when the file is shorter than
            # offset + size, which would otherwise become SIGBUS on access.
            # NOTE: a front-end that shrinks the file after this check still
            # causes SIGBUS, which ends this process.
            raise MemoryTableError(
                request, f"{description}: mmap of fd {fd} failed: {error}"
            ) from None
        self._buffer = memoryview(self._mmap)[delta : delta + description.memory_size]
        self.region = MemoryRegion(
            description.guest_phys_addr,
            self._buffer,
            user_addr=description.userspace_addr,
        )

    @property
    def user_end(self) -> int:
        """First user address past the region."""
        return self.description.userspace_addr + self.description.memory_size

    def close(self) -> None:
        """Release this object's views and unmap the region.

        Python cannot unmap memory that a view still exports, so a view the
        device kept past ``stop_queue`` delays the unmap until it is freed.
        """
        try:
            self.region.view.release()
            self._buffer.release()
            self._mmap.close()
        except BufferError:
            logger.warning(
                "%s is still referenced by a memoryview; it is unmapped when the"
                " last view is freed",
                self.description,
            )


class MemoryTable:
    """The mapped regions of one connection, kept sorted by guest address.

    ``fence`` goes to every ``GuestMemory`` built from the table, so the
    virtqueue code orders its accesses against the front-end's.
    """

    def __init__(self, fence: Callable[[], None], max_regions: int) -> None:
        self.fence = fence
        self.max_regions = max_regions
        self.regions: list[MappedRegion] = []
        self.memory: GuestMemory | None = None

    def map_regions(
        self, request: str, descriptions: Sequence[VhostMemoryRegion], fds: list[int]
    ) -> list[MappedRegion]:
        """Map the regions of a new table (SET_MEM_TABLE) without installing them.

        Takes ownership of ``fds``, one a region in the same order, and closes
        them once mapped. On failure nothing stays mapped.
        """
        mapped: list[MappedRegion] = []
        try:
            for description, fd in zip(descriptions, fds, strict=True):
                mapped.append(MappedRegion(request, description, fd))
        except MemoryTableError:
            for region in mapped:
                region.close()
            raise
        finally:
            _close_fds(fds)
        return mapped

    def install(self, mapped: list[MappedRegion]) -> None:
        """Replace the whole table with ``mapped`` and unmap the old regions."""
        old, self.regions = self.regions, mapped
        self._rebuild()
        for region in old:
            region.close()

    def map_region(
        self, request: str, description: VhostMemoryRegion, fd: int
    ) -> MappedRegion:
        """Map one more region (ADD_MEM_REG) without installing it.

        Takes ownership of ``fd``. Raises ``MemoryTableError`` when the table is
        full or the region overlaps one already in it.
        """
        try:
            if len(self.regions) >= self.max_regions:
                raise MemoryTableError(
                    request,
                    f"{description}: the table already has the maximum of"
                    f" {self.max_regions} regions",
                )
            known = [region.description for region in self.regions]
            check_regions(request, known + [description])
            return MappedRegion(request, description, fd)
        finally:
            os.close(fd)

    def insert(self, mapped: MappedRegion) -> None:
        """Add a region mapped by ``map_region`` to the table."""
        self.regions.append(mapped)
        self._rebuild()

    def remove(self, request: str, description: VhostMemoryRegion) -> None:
        """Unmap the region with the same guest address, user address and size.

        The mmap offset is not compared, as REM_MEM_REG specifies.
        """
        for region in self.regions:
            known = region.description
            if (
                known.guest_phys_addr == description.guest_phys_addr
                and known.userspace_addr == description.userspace_addr
                and known.memory_size == description.memory_size
            ):
                self.regions.remove(region)
                self._rebuild()
                region.close()
                return
        raise MemoryTableError(request, f"{description} is not in the memory table")

    def user_to_guest(self, user_addr: int, length: int) -> int | None:
        """Translate a user address range to guest-physical, or return None.

        The whole range must lie in one region, because the virtqueue code
        reads each ring through a single view.
        """
        for region in self.regions:
            start = region.description.userspace_addr
            if start <= user_addr and user_addr + length <= region.user_end:
                return region.description.guest_phys_addr + (user_addr - start)
        return None

    def close(self) -> None:
        """Unmap every region."""
        regions, self.regions = self.regions, []
        self.memory = None
        for region in regions:
            region.close()

    def _rebuild(self) -> None:
        self.regions.sort(key=lambda region: region.description.guest_phys_addr)
        if self.regions:
            self.memory = GuestMemory(
                [region.region for region in self.regions], fence=self.fence
            )
        else:
            self.memory = None


def _close_fds(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())
