"""Build the test guest: a Debian cloud kernel and a busybox initramfs.

The initramfs contains a static busybox, the kernel's virtio modules (see
``VIRTIO_MODULES``), the UDP generator ``udpgen.c`` built with ``gcc -static``
and ``init.sh`` as /init. The result is cached under a key made of every input,
so a second build with the same inputs only hashes files.

Command line: ``python -m tests.guest.build_image [--install] [--cache-dir D]``
prints the image paths as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import logging
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import debian_packages
from .cpio import CpioWriter
from .debian_packages import MissingDependency

__all__ = [
    "KERNEL_METAPACKAGE",
    "VIRTIO_MODULES",
    "GuestImage",
    "build_image",
    "default_cache_dir",
]

logger = logging.getLogger(__name__)

#: Bump when the layout of the image changes in a way the inputs do not show.
IMAGE_FORMAT = 1

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"

#: Modules in load order, each after the ones it needs. A kernel may have
#: some of them built in (listed in modules.builtin) and older kernels lack
#: the virtio_pci_*_dev and failover ones. Those are skipped.
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)

#: Modules without which the guest has no eth0: an error when neither a file
#: nor built in.
REQUIRED_MODULES = frozenset({"virtio_ring", "virtio", "virtio_pci", "virtio_net"})

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_HERE = Path(__file__).resolve().parent
_INITRAMFS_DIRECTORIES = (
    "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
    "etc", "etc/vne", "lib", "lib/modules",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A bootable guest: the kernel, the initramfs and what went into them."""

    kernel: Path
    initrd: Path
    kernel_package: str
    kernel_release: str
    #: Modules the initramfs loads, in order.
    modules: tuple[str, ...]
    #: Modules of ``VIRTIO_MODULES`` that the kernel has built in.
    builtin_modules: tuple[str, ...]
    #: Modules of ``VIRTIO_MODULES`` the kernel has neither as file nor built in.
    absent_modules: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        fields = dataclasses.asdict(self)
        return {
            key: str(value) if isinstance(value, Path) else value
            for key, value in fields.items()
        }


def default_cache_dir() -> Path:
    """Return the cache directory: $VIRTIO_NET_EMU_CACHE, $XDG_CACHE_HOME/...

    The fallbacks are /var/cache/virtio-net-emu for root and
    ~/.cache/virtio-net-emu for other users.
    """
    if os.environ.get("VIRTIO_NET_EMU_CACHE"):
        return Path(os.environ["VIRTIO_NET_EMU_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "virtio-net-emu"
    if os.geteuid() == 0:
        return Path("/var/cache/virtio-net-emu")
    return Path.home() / ".cache" / "virtio-net-emu"


def build_image(cache_dir: Path | None = None, install: bool = False) -> GuestImage:
    """Return the guest image, building it first unless it is cached.

    With ``install`` true, missing host packages are installed with apt-get
    (root only). The kernel .deb is always downloaded when it is not in the
    cache. Raises MissingDependency when a package, the kernel or a required
    module cannot be obtained.
    """
    cache_dir = cache_dir or default_cache_dir()
    debian_packages.ensure_packages(
        ("busybox-static", "gcc", "libc6-dev"), install=install
    )
    kernel_package = debian_packages.resolve_dependency(
        KERNEL_METAPACKAGE, "linux-image-", install=install
    )
    kernel_root = _fetch_kernel(kernel_package, cache_dir)
    busybox = _find_static_busybox()
    key = _cache_key(kernel_package, kernel_root, busybox)
    image_dir = cache_dir / "images" / key
    manifest = image_dir / "manifest.json"
    if manifest.exists():
        logger.info("using cached guest image %s", image_dir)
        return _load_manifest(manifest)
    image = _build_into(image_dir, kernel_package, kernel_root, busybox)
    logger.info("built guest image %s", image_dir)
    return image


def _fetch_kernel(kernel_package: str, cache_dir: Path) -> Path:
    """Download and unpack the kernel package once; return the unpack root."""
    kernel_root = cache_dir / "kernels" / kernel_package
    if (kernel_root / ".unpacked").exists():
        return kernel_root
    deb = debian_packages.download_package(kernel_package, cache_dir / "debs")
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache_dir))
    try:
        debian_packages.unpack_package(deb, staging)
        (staging / ".unpacked").write_text(deb.name + "\n")
        if kernel_root.exists():
            shutil.rmtree(kernel_root)
        kernel_root.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(kernel_root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return kernel_root


def _find_static_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and _is_static_elf(path):
            return path
    raise MissingDependency(
        "no statically linked busybox found in /bin or /usr/bin; "
        "install the Debian package busybox-static"
    )


def _is_static_elf(path: Path) -> bool:
    """Tell whether an ELF64 executable has no PT_INTERP (dynamic loader) header."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return False
    program_header_offset = int.from_bytes(data[32:40], "little")
    entry_size = int.from_bytes(data[54:56], "little")
    entry_count = int.from_bytes(data[56:58], "little")
    pt_interp = 3
    for index in range(entry_count):
        start = program_header_offset + index * entry_size
        if int.from_bytes(data[start : start + 4], "little") == pt_interp:
            return False
    return True


def _kernel_paths(kernel_root: Path) -> tuple[Path, Path]:
    """Return the vmlinuz and the lib/modules/RELEASE directory of a kernel."""
    kernels = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise MissingDependency(f"no boot/vmlinuz-* in {kernel_root}")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    for lib in ("lib", "usr/lib"):
        modules_dir = kernel_root / lib / "modules" / release
        if modules_dir.is_dir():
            return kernels[-1], modules_dir
    raise MissingDependency(f"no lib/modules/{release} in {kernel_root}")


def _cache_key(kernel_package: str, kernel_root: Path, busybox: Path) -> str:
    # NOTE: images of older keys stay in the cache. Delete its images/
    # directory to reclaim the space (about 16 MB per image).
    digest = hashlib.sha256()
    digest.update(f"format {IMAGE_FORMAT}\n".encode())
    digest.update(f"kernel {(kernel_root / '.unpacked').read_text()}".encode())
    digest.update(f"modules {','.join(VIRTIO_MODULES)}\n".encode())
    digest.update(_gcc_version().encode())
    for path in (busybox, _HERE / "init.sh", _HERE / "udpgen.c", Path(__file__)):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{kernel_package}-{digest.hexdigest()[:16]}"


def _gcc_version() -> str:
    try:
        result = subprocess.run(
            ["gcc", "--version"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as error:
        raise MissingDependency(f"gcc --version failed: {error}") from error
    return result.stdout.splitlines()[0]


def _build_into(
    image_dir: Path, kernel_package: str, kernel_root: Path, busybox: Path
) -> GuestImage:
    vmlinuz, modules_dir = _kernel_paths(kernel_root)
    modules, builtin, absent = _select_modules(modules_dir)
    image_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=image_dir.parent))
    staging.chmod(0o755)
    try:
        udpgen = _compile_udpgen(staging)
        archive = _initramfs(busybox, udpgen, modules)
        (staging / "initramfs.cpio.gz").write_bytes(gzip.compress(archive, mtime=0))
        shutil.copyfile(vmlinuz, staging / "vmlinuz")
        image = GuestImage(
            kernel=image_dir / "vmlinuz",
            initrd=image_dir / "initramfs.cpio.gz",
            kernel_package=kernel_package,
            kernel_release=modules_dir.name,
            modules=tuple(name for name, _ in modules),
            builtin_modules=builtin,
            absent_modules=absent,
        )
        (staging / "manifest.json").write_text(json.dumps(image.to_json(), indent=2))
        # A concurrent build of the same key may have finished first. Both
        # results are equal, so the first one stays.
        try:
            staging.rename(image_dir)
        except OSError:
            if not (image_dir / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return image


def _select_modules(
    modules_dir: Path,
) -> tuple[list[tuple[str, Path]], tuple[str, ...], tuple[str, ...]]:
    """Find each of VIRTIO_MODULES as a file, as built in, or as absent."""
    files: dict[str, Path] = {}
    for path in modules_dir.rglob("*.ko*"):
        for suffix in _MODULE_SUFFIXES:
            if path.name.endswith(suffix):
                files[path.name.removesuffix(suffix).replace("-", "_")] = path
    builtin_file = modules_dir / "modules.builtin"
    builtin_names = set()
    if builtin_file.exists():
        for line in builtin_file.read_text().splitlines():
            builtin_names.add(Path(line).name.removesuffix(".ko").replace("-", "_"))

    modules: list[tuple[str, Path]] = []
    builtin: list[str] = []
    absent: list[str] = []
    for name in VIRTIO_MODULES:
        if name in files:
            modules.append((name, files[name]))
        elif name in builtin_names:
            builtin.append(name)
        elif name in REQUIRED_MODULES:
            raise MissingDependency(
                f"module {name} is neither in {modules_dir} nor built in"
            )
        else:
            absent.append(name)
    return modules, tuple(builtin), tuple(absent)


def _read_module(path: Path) -> bytes:
    """Return the uncompressed bytes of a .ko, .ko.xz, .ko.gz or .ko.zst file.

    Modules are decompressed here because busybox insmod reads compressed
    modules only when built with the matching option, and never zstd.
    """
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise MissingDependency(
                f"{path} is zstd-compressed; install the Debian package zstd"
            )
        result = subprocess.run(
            ["zstd", "-dc", str(path)], capture_output=True, check=True
        )
        return result.stdout
    return path.read_bytes()


def _compile_udpgen(directory: Path) -> Path:
    output = directory / "udpgen"
    command = [
        "gcc",
        "-static",
        "-O2",
        "-Wall",
        "-o",
        str(output),
        str(_HERE / "udpgen.c"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MissingDependency(
            f"{' '.join(command)} failed with exit code {result.returncode} "
            f"(libc6-dev provides the static libc): {result.stderr.strip()[-1500:]}"
        )
    return output


def _busybox_applets(busybox: Path) -> list[str]:
    result = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    )
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def _initramfs(busybox: Path, udpgen: Path, modules: list[tuple[str, Path]]) -> bytes:
    archive = CpioWriter()
    for directory in _INITRAMFS_DIRECTORIES:
        archive.add_directory(directory)
    # The kernel opens /dev/console for init's stdio before devtmpfs exists.
    archive.add_char_device("dev/console", 5, 1, 0o600)

    archive.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox":
            archive.add_symlink(applet, "/bin/busybox")
    archive.add_file("bin/udpgen", udpgen.read_bytes(), 0o755)

    module_paths = []
    for name, path in modules:
        target = f"lib/modules/{name}.ko"
        archive.add_file(target, _read_module(path))
        module_paths.append(f"/{target}\n")
    archive.add_file("etc/vne/modules", "".join(module_paths).encode())

    archive.add_file("init", (_HERE / "init.sh").read_bytes(), 0o755)
    return archive.finish()


def _load_manifest(manifest: Path) -> GuestImage:
    fields = json.loads(manifest.read_text())
    # The paths are rebuilt from the manifest's place, so a moved cache works.
    return GuestImage(
        kernel=manifest.parent / "vmlinuz",
        initrd=manifest.parent / "initramfs.cpio.gz",
        kernel_package=fields["kernel_package"],
        kernel_release=fields["kernel_release"],
        modules=tuple(fields["modules"]),
        builtin_modules=tuple(fields["builtin_modules"]),
        absent_modules=tuple(fields["absent_modules"]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"cache directory (default: {default_cache_dir()})",
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="install missing Debian packages with apt-get",
    )
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        image = build_image(arguments.cache_dir, install=arguments.install)
    except MissingDependency as error:
        logger.error("%s", error)
        return 1
    json.dump(image.to_json(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
