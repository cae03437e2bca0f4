"""Safe extraction of ImageFolder archives (.zip, .tar, .tar.gz) and a check of their layout.

Nothing is trusted: every member name is checked (no absolute paths, no ``..``, no backslashes),
only regular files and directories are accepted (no symlinks, hard links or devices). Before one
byte is written the entries are counted and each image's declared size is checked (a zip's central
directory; a tar is read once for its headers, and must end with its end-of-archive blocks). While
extracting, the bytes written are held to the declared sizes and the total cap (a lying header or a
zip bomb stops there), and each image's header is read as it lands (pixel cap, checksums). Files
that are not images (README, labels.csv) are not kept.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

CHUNK_BYTES = 1024 * 1024
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_SIZES_KEPT = 3  # distinct image sizes recorded for a dataset (two already mean "set image_size")
_IGNORED_PARTS = ("__MACOSX",)
_IGNORED_NAMES = (".DS_Store", "Thumbs.db")


class ArchiveError(ValueError):
    """An archive that is unsafe or not an ImageFolder tree; the message says why."""


def archive_kind(filename: str) -> str | None:
    lower = filename.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return "zip" if suffix == ".zip" else "tar"
    return None


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """The path parts of a member, or None for an entry to skip; raises on an unsafe name."""
    if not name or "\x00" in name:
        raise ArchiveError("an archive entry has an empty or invalid name")
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"archive entry {name!r} has an absolute or Windows path; only relative paths")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"archive entry {name!r} contains '..'; entries must stay inside the archive")
    if not parts or any(p in _IGNORED_PARTS for p in parts) or parts[-1] in _IGNORED_NAMES:
        return None
    return parts


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int  # entries (files) in the archive, counted before anything is extracted
    max_bytes: int  # bytes the kept images extract to, together
    max_image_bytes: int  # bytes of one image file
    max_image_pixels: int  # width x height of one image


def _too_many(count: int, limits: ArchiveLimits) -> ArchiveError:
    return ArchiveError(
        f"the archive holds {count} files, more than {limits.max_files}, the limit; "
        "split the dataset or ask the operator to raise LORITA_MAX_ARCHIVE_FILES"
    )


def _too_big(limits: ArchiveLimits) -> ArchiveError:
    return ArchiveError(
        f"the archive's images extract to more than {limits.max_bytes} bytes, the limit "
        "(LORITA_MAX_ARCHIVE_BYTES); upload a smaller dataset"
    )


def is_image_name(parts: tuple[str, ...]) -> bool:
    return parts[-1].lower().endswith(IMAGE_SUFFIXES)


class _Budget:
    """Bytes written so far, against the declared sizes and the archive's cap."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.files = 0
        self.bytes = 0
        self.sizes: dict[str, str] = {}  # "WxH" -> the first image of that size (a few kept)

    def check_image(self, path: Path, parts: tuple[str, ...]) -> None:
        """:func:`check_image` on an image just written, and note its size."""
        name = "/".join(parts)
        width, height = check_image(path, name, self.limits.max_image_pixels)
        key = f"{width}x{height}"
        if key not in self.sizes and len(self.sizes) < MAX_SIZES_KEPT:
            self.sizes[key] = name

    def declare(self, name: str, size: int) -> None:
        if size < 0 or size > self.limits.max_image_bytes:
            raise ArchiveError(
                f"archive entry {name!r} declares {size} bytes, more than {self.limits.max_image_bytes} "
                "for one image (LORITA_MAX_IMAGE_BYTES)"
            )

    def count(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_bytes:
            raise _too_big(self.limits)


def _write_member(src: IO[bytes], dest: Path, declared: int, budget: _Budget, name: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        # "xb": a duplicate entry never overwrites a file extracted earlier
        with dest.open("xb") as out:
            while chunk := src.read(CHUNK_BYTES):
                written += len(chunk)
                if written > declared:
                    raise ArchiveError(f"archive entry {name!r} is larger than its header declares")
                budget.count(len(chunk))
                out.write(chunk)
    except FileExistsError:
        raise ArchiveError(f"archive entry {name!r} appears twice") from None
    if written != declared:
        raise ArchiveError(f"archive entry {name!r} is truncated ({written} of {declared} bytes)")
    budget.files += 1


def check_image(path: Path, name: str, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the image at ``path``, read from its header; the file's chunks are
    walked (PIL's ``verify``: checksums, no pixel decoding). Raises ArchiveError naming ``name``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ArchiveError(
                    f"image {name} is {width}x{height} = {width * height} pixels, more than "
                    f"{max_pixels} (LORITA_MAX_IMAGE_PIXELS); resize it"
                )
            img.verify()
    except ArchiveError:
        raise
    except Image.DecompressionBombError:
        raise ArchiveError(
            f"image {name} has more pixels than {max_pixels} (LORITA_MAX_IMAGE_PIXELS); resize it"
        ) from None
    except Exception:  # PIL raises many types (SyntaxError, OSError, struct.error...) for bad files
        raise ArchiveError(
            f"{name} is not a readable image (damaged, truncated, or not the format its name says); "
            "replace or remove it"
        ) from None
    return width, height


def _target(root: Path, parts: tuple[str, ...]) -> Path:
    target = root.joinpath(*parts)
    # belt and braces: the name checks above already keep it inside
    if not target.resolve().is_relative_to(root.resolve()):
        raise ArchiveError(f"archive entry {'/'.join(parts)!r} would land outside the extraction folder")
    return target


def _check_zip_entry(info: zipfile.ZipInfo) -> tuple[str, ...] | None:
    # Unix type bits, when the zip was made on Unix (0 otherwise, e.g. Windows or writestr)
    mode = stat.S_IFMT(info.external_attr >> 16)
    if stat.S_ISLNK(mode):
        raise ArchiveError(f"archive entry {info.filename!r} is a symbolic link; links are not allowed")
    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ArchiveError(f"archive entry {info.filename!r} is not a regular file or folder")
    return _safe_parts(info.filename)


def _extract_zip(src: Path, root: Path, budget: _Budget) -> None:
    limits = budget.limits
    with zipfile.ZipFile(src) as zf:
        # everything is decided from the central directory before one byte is written
        infos = zf.infolist()
        files = sum(1 for i in infos if not i.is_dir())
        if files > limits.max_files:
            raise _too_many(files, limits)
        wanted: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
        for info in infos:
            parts = _check_zip_entry(info)
            if parts is None or info.is_dir() or not is_image_name(parts):
                continue  # folders are made as needed; other files (README, labels.csv) are not kept
            budget.declare(info.filename, info.file_size)
            wanted.append((info, parts))
        if sum(info.file_size for info, _ in wanted) > limits.max_bytes:
            raise _too_big(limits)
        for info, parts in wanted:
            target = _target(root, parts)
            with zf.open(info) as member:
                _write_member(member, target, info.file_size, budget, info.filename)
            budget.check_image(target, parts)


def _tar_entry(member: tarfile.TarInfo) -> tuple[str, ...] | None:
    if member.issym() or member.islnk():
        raise ArchiveError(f"archive entry {member.name!r} is a link; links are not allowed")
    if not (member.isreg() or member.isdir()):
        raise ArchiveError(f"archive entry {member.name!r} is not a regular file or folder")
    return _safe_parts(member.name)


def _scan_tar(src: Path, budget: _Budget) -> None:
    """The first pass: every header checked, entries counted and the archive's end found, before
    anything is written. A tar has no index, so this reads it once (sequentially)."""
    limits = budget.limits
    files = declared = 0
    with tarfile.open(src, mode="r:*") as tf:
        for member in tf:
            parts = _tar_entry(member)
            if member.isdir():
                continue
            files += 1
            if files > limits.max_files:
                raise _too_many(files, limits)
            if parts is not None and is_image_name(parts):
                budget.declare(member.name, member.size)
                declared += member.size
                if declared > limits.max_bytes:
                    raise _too_big(limits)
        # tar ends with two zero blocks; a cut at a member boundary reads as a shorter, valid-looking
        # archive without them
        stream = tf.fileobj
        assert stream is not None
        stream.seek(tf.offset)
        end = stream.read(2 * tarfile.BLOCKSIZE)
        if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
            raise ArchiveError(
                "the archive is truncated (its end-of-archive marker is missing); upload it again"
            )
        while stream.read(CHUNK_BYTES):  # a compressed stream checks its length and CRC at its end
            pass


def _extract_tar(src: Path, root: Path, budget: _Budget) -> None:
    _scan_tar(src, budget)
    with tarfile.open(src, mode="r:*") as tf:
        # the second pass reads members in order: sequential, also for .tar.gz
        for member in tf:
            parts = _tar_entry(member)
            if parts is None or member.isdir() or not is_image_name(parts):
                continue
            target = _target(root, parts)
            fileobj = tf.extractfile(member)
            if fileobj is None:
                raise ArchiveError(f"archive entry {member.name!r} cannot be read")
            with fileobj:
                _write_member(fileobj, target, member.size, budget, member.name)
            budget.check_image(target, parts)


@dataclass(frozen=True)
class Extracted:
    files: int
    # up to MAX_SIZES_KEPT distinct image sizes, each with the first image that has it:
    # [{"size": "32x32", "example": "train/cat/1.png"}, ...]; more than one needs dataset.image_size
    sizes: list[dict[str, str]]


def extract_archive(src: Path, dest: Path, *, kind: str, limits: ArchiveLimits) -> Extracted:
    """Extract the images of ``src`` into the empty folder ``dest``; says how many were written and
    which image sizes were seen.

    The entry count, every name and link type, and the declared sizes are checked before anything
    is written; the bytes written are counted against the declared sizes and the cap, and each
    image's header is read as it lands. Raises ArchiveError; the caller removes ``dest`` then.
    """
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(limits)
    try:
        if kind == "zip":
            _extract_zip(src, dest, budget)
        else:
            _extract_tar(src, dest, budget)
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ArchiveError(
            f"the archive cannot be read ({reason}); upload a complete .zip, .tar or .tar.gz"
        ) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise  # the server's problem, not the upload's: the app answers 507
        raise ArchiveError(
            f"the archive cannot be read ({err.strerror or type(err).__name__}); "
            "upload a complete .zip, .tar or .tar.gz"
        ) from None
    return Extracted(budget.files, [{"size": k, "example": v} for k, v in budget.sizes.items()])


@dataclass(frozen=True)
class ImageFolderInfo:
    root: Path  # the folder holding either train/ and test/, or the class folders
    split: bool  # True: train/ and test/ given
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]
    n_train: int
    n_test: int


def _images_by_class(folder: Path) -> dict[str, list[Path]]:
    stray = [p.name for p in folder.iterdir() if p.is_file()]
    if stray:
        raise ArchiveError(
            f"{folder.name or 'the archive'}/ holds files outside class folders ({', '.join(stray[:3])}); "
            "lay it out as <class>/<image> or train/<class>/<image> + test/<class>/<image>"
        )
    found: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = sorted(p for p in _walk_files(class_dir) if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            found[class_dir.name] = images
    return found


def _walk_files(folder: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            yield Path(dirpath) / f


def _unwrap(root: Path) -> Path:
    # archives made with `zip -r data.zip data/` wrap everything in one folder; a single class
    # folder is never a valid tree, so descending through lone folders loses nothing
    entries = list(root.iterdir())
    while len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("train", "test"):
        root = entries[0]
        entries = list(root.iterdir())
    return root


def _image_shape(path: Path) -> tuple[int, int, int]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception:  # every image was checked while extracting; this is belt and braces
        raise ArchiveError(f"cannot read image {path.name}; replace or remove it") from None
    return (3, height, width)  # core reads every image as RGB


def inspect_image_folder(extracted: Path) -> ImageFolderInfo:
    """Check the ImageFolder layout; the counts follow core.data's own split of a flat tree."""
    root = _unwrap(extracted)
    train_dir, test_dir = root / "train", root / "test"
    layout_hint = "lay it out as <class>/<image> or train/<class>/<image> + test/<class>/<image>"
    if train_dir.is_dir() and test_dir.is_dir():
        train, test = _images_by_class(train_dir), _images_by_class(test_dir)
        extra = sorted(set(test) - set(train))
        if extra:
            raise ArchiveError(f"test/ has class folder(s) {', '.join(extra)} that train/ lacks")
        if not test:
            raise ArchiveError(f"test/ holds no images; {layout_hint}")
        classes = tuple(train)
        n_train, n_test = sum(map(len, train.values())), sum(map(len, test.values()))
        first = next(iter(train.values()))[0]
        split = True
    else:
        if train_dir.is_dir() != test_dir.is_dir():
            raise ArchiveError(f"the archive has only one of train/ and test/; {layout_hint}")
        per_class = _images_by_class(root)
        classes = tuple(per_class)
        n_train, n_test = _flat_split_counts([len(v) for v in per_class.values()])
        first = next(iter(per_class.values()))[0] if per_class else root
        split = False
    if len(classes) < 2:
        raise ArchiveError(
            f"found {len(classes)} class folder(s) with images; a classifier needs two; {layout_hint}"
        )
    return ImageFolderInfo(root, split, classes, _image_shape(first), n_train, n_test)


def _flat_split_counts(per_class: list[int]) -> tuple[int, int]:
    import torch

    from core.data import FIXED_DATA_SEED, HOLDOUT_FRACTION, stratified_split

    if not per_class:  # no images at all: refused below for having no classes (torch.cat needs one)
        return 0, 0
    labels = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(per_class)])
    kept, held = stratified_split(labels, HOLDOUT_FRACTION, FIXED_DATA_SEED)
    return len(kept), len(held)
