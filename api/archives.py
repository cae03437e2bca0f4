"""Safe extraction of ImageFolder archives (.zip, .tar, .tar.gz) and a check of their layout.

Nothing is trusted: every member name is checked (no absolute paths, no ``..``, no backslashes),
only regular files and directories are accepted (no symlinks, hard links or devices), and the
number of files and bytes are capped twice: by the sizes the archive declares, and by the bytes
actually written while extracting (a lying header or a zip bomb stops at the cap).
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

CHUNK_BYTES = 1024 * 1024
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
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


class _Budget:
    def __init__(self, max_files: int, max_bytes: int) -> None:
        self.max_files, self.max_bytes = max_files, max_bytes
        self.files = 0
        self.bytes = 0

    def add_file(self, declared_size: int) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise ArchiveError(f"the archive holds more than {self.max_files} files, the limit")
        if declared_size < 0 or self.bytes + declared_size > self.max_bytes:
            raise ArchiveError(f"the archive extracts to more than {self.max_bytes} bytes, the limit")

    def count(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise ArchiveError(f"the archive extracts to more than {self.max_bytes} bytes, the limit")


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


def _target(root: Path, parts: tuple[str, ...]) -> Path:
    target = root.joinpath(*parts)
    # belt and braces: the name checks above already keep it inside
    if not target.resolve().is_relative_to(root.resolve()):
        raise ArchiveError(f"archive entry {'/'.join(parts)!r} would land outside the extraction folder")
    return target


def _extract_zip(src: Path, root: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
        if len(infos) > budget.max_files * 2:
            raise ArchiveError(f"the archive holds more than {budget.max_files} files, the limit")
        declared_total = sum(i.file_size for i in infos)
        if declared_total > budget.max_bytes:
            raise ArchiveError(f"the archive extracts to more than {budget.max_bytes} bytes, the limit")
        for info in infos:
            # Unix type bits, when the zip was made on Unix (0 otherwise, e.g. Windows or writestr)
            mode = stat.S_IFMT(info.external_attr >> 16)
            if stat.S_ISLNK(mode):
                raise ArchiveError(
                    f"archive entry {info.filename!r} is a symbolic link; links are not allowed"
                )
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ArchiveError(f"archive entry {info.filename!r} is not a regular file or folder")
            parts = _safe_parts(info.filename)
            if parts is None:
                continue
            target = _target(root, parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            budget.add_file(info.file_size)
            with zf.open(info) as member:
                _write_member(member, target, info.file_size, budget, info.filename)


def _extract_tar(src: Path, root: Path, budget: _Budget) -> None:
    with tarfile.open(src, mode="r:*") as tf:
        # iterate lazily: a huge member list fails at the file cap, not after reading it all
        for member in tf:
            if member.issym() or member.islnk():
                raise ArchiveError(f"archive entry {member.name!r} is a link; links are not allowed")
            if not (member.isreg() or member.isdir()):
                raise ArchiveError(f"archive entry {member.name!r} is not a regular file or folder")
            parts = _safe_parts(member.name)
            if parts is None:
                continue
            target = _target(root, parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            budget.add_file(member.size)
            fileobj = tf.extractfile(member)
            if fileobj is None:
                raise ArchiveError(f"archive entry {member.name!r} cannot be read")
            with fileobj:
                _write_member(fileobj, target, member.size, budget, member.name)


def extract_archive(src: Path, dest: Path, *, kind: str, max_files: int, max_bytes: int) -> int:
    """Extract ``src`` into the empty folder ``dest``; returns the number of files written.

    Raises ArchiveError; the caller removes ``dest`` then, since it may hold a partial tree.
    """
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(max_files, max_bytes)
    try:
        if kind == "zip":
            _extract_zip(src, dest, budget)
        else:
            _extract_tar(src, dest, budget)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        if isinstance(err, ArchiveError):
            raise
        raise ArchiveError(f"the archive cannot be read ({err}); upload a .zip, .tar or .tar.gz") from None
    return budget.files


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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as err:
        raise ArchiveError(f"cannot read image {path.name}: {err}") from None
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

    labels = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(per_class)])
    kept, held = stratified_split(labels, HOLDOUT_FRACTION, FIXED_DATA_SEED)
    return len(kept), len(held)
