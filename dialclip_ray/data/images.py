"""Safe access to image files named by untrusted data.

Image names come from dataset records (photo ids, media keys), so a record could
name ``../../etc/passwd``, an absolute path, a symlink pointing outside the image
root, or a tiny file that decodes to gigapixels. Every image the project opens
goes through :func:`resolve_image_path` (confined to its root) and
:func:`open_image` (pixel count checked from the header before decoding).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from dialclip_ray.data.errors import DataError

# 64 megapixels: far above any dataset photo, far below what exhausts memory.
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def resolve_image_path(root: str | os.PathLike, relative: str, *, record: object = None,
                       field: str | None = "path") -> Path:
    """``root / relative`` after checking it stays inside ``root`` (symlinks followed)."""
    root_path = Path(root).resolve()
    rel = check_relative_name(relative, root_path, record=record, field=field)
    full = (root_path / rel).resolve()
    if not full.is_relative_to(root_path):
        raise DataError(relative, record, field, f"image path resolves outside the image root {root_path} "
                        f"(to {full})", kind="image_path")
    return full


def check_relative_name(relative: str, root: object = "the image root", *, record: object = None,
                        field: str | None = "path") -> str:
    """The name checks of :func:`resolve_image_path` without touching the file system (``/``-separated name).

    Enough for names written without opening the file (``--no-image-check``); readers still
    resolve every path against the root (symlinks followed) before opening it.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise DataError(relative, record, field, "image path must be a non-empty string", kind="image_path")
    rel = relative.replace("\\", "/")
    if rel.startswith("/") or os.path.isabs(relative) or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(relative, record, field, f"image path must be relative to the image root {root}",
                        kind="image_path")
    if ".." in rel and ".." in PurePosixPath(rel).parts:
        raise DataError(relative, record, field, "image path must not contain '..'", kind="image_path")
    return rel


def image_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, *, record: object = None,
               field: str | None = "image", verify: bool = True) -> tuple[int, int]:
    """(width, height) from the header, checking the file is an image within ``max_pixels``."""
    with _open_checked(path, max_pixels, record, field) as img:
        size = img.size
        if verify:
            try:
                img.verify()
            except Exception as exc:  # Pillow raises many types for corrupt data
                raise DataError(path, record, field, f"unreadable image: {exc}", kind="image_unreadable") from exc
    return size


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, *, record: object = None,
               field: str | None = "image") -> Image.Image:
    """Decode an image as RGB after checking its pixel count from the header."""
    with _open_checked(path, max_pixels, record, field) as img:
        try:
            img.load()
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(path, record, field, f"unreadable image: {exc}", kind="image_unreadable") from exc


def _open_checked(path: str | os.PathLike, max_pixels: int, record: object, field: str | None) -> Image.Image:
    if not os.path.isfile(path):
        raise DataError(path, record, field, "image file does not exist", kind="image_missing")
    if os.path.getsize(path) == 0:
        raise DataError(path, record, field, "image file is empty (0 bytes): an interrupted download or copy?",
                        kind="image_unreadable")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(path, record, field, f"image too large: {exc}", kind="image_oversized") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(path, record, field, f"unreadable image: {exc}", kind="image_unreadable") from exc
    w, h = img.size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        img.close()
        raise DataError(path, record, field, f"image too large: {w}x{h} = {w * h} pixels > max_pixels={max_pixels}",
                        kind="image_oversized")
    return img


def stable_id(text: str, prefix: str = "") -> str:
    """A short deterministic id (sha1 hex[:16]) for records whose source has none."""
    return prefix + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class ImageLocator:
    """Finds an image file for an id by trying filename patterns in order.

    Patterns are ``str.format`` templates relative to ``root``. Fields: ``id``,
    ``id_basename`` (last ``/`` part, so ``train/624e..`` -> ``624e..``), ``id_safe``
    (``/`` replaced by ``_``), ``ext`` (each of ``extensions`` in turn) plus any hints
    a loader passes (PhotoChat: ``url_basename``; MMDialog: ``split``).
    """

    root: Path
    patterns: Sequence[str]
    extensions: Sequence[str] = DEFAULT_EXTENSIONS

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        if not self.patterns:
            raise ValueError("at least one image pattern is needed")

    def candidates(self, image_id: str, hints: dict[str, str] | None = None) -> list[str]:
        fields_ = {"id": image_id, "id_basename": image_id.rsplit("/", 1)[-1],
                   "id_safe": image_id.replace("/", "_"), **(hints or {})}
        out: list[str] = []
        for pattern in self.patterns:
            exts: Iterable[str] = self.extensions if "{ext}" in pattern else ("",)
            for ext in exts:
                try:
                    name = pattern.format(**fields_, ext=ext)
                except (KeyError, IndexError) as exc:
                    raise ValueError(f"image pattern {pattern!r} uses an unknown field {exc}; "
                                     f"known: {', '.join(sorted(fields_))}, ext") from None
                if name not in out:
                    out.append(name)
        return out

    def find(self, image_id: str, hints: dict[str, str] | None = None, *, file: object = None,
             record: object = None, field: str | None = None) -> str:
        """The path (relative to root) of the first existing candidate; DataError when none exists."""
        names = self.candidates(image_id, hints)
        for name in names:
            try:
                full = resolve_image_path(self.root, name, record=record, field=field)
            except DataError as exc:
                raise DataError(file if file is not None else name, record, field,
                                f"image {image_id!r} -> {name!r}: {exc.message}", kind=exc.kind) from None
            if full.is_file():
                return full.relative_to(self.root).as_posix()
        raise DataError(file if file is not None else self.root, record, field,
                        f"image {image_id!r} not found under {self.root} (tried {self.describe(image_id, hints)})",
                        kind="image_missing")

    def describe(self, image_id: str, hints: dict[str, str] | None = None, limit: int = 12) -> str:
        """The names :meth:`candidates` tries, one entry per pattern (``abc.{jpg,png}``), for error messages.

        Every pattern is shown (up to ``limit``), so a later pattern such as PhotoChat's
        ``{url_basename}`` is never hidden behind the extension variants of the first one.
        """
        fields_ = {"id": image_id, "id_basename": image_id.rsplit("/", 1)[-1],
                   "id_safe": image_id.replace("/", "_"), **(hints or {})}
        exts = "{" + ",".join(self.extensions) + "}" if len(self.extensions) > 1 else \
            (self.extensions[0] if self.extensions else "")
        shown: list[str] = []
        for pattern in self.patterns:
            try:
                name = pattern.format(**fields_, ext=exts)
            except (KeyError, IndexError):
                continue  # candidates() already raised for an unknown field
            if name not in shown:
                shown.append(name)
        return ", ".join(shown[:limit]) + (f", ... ({len(shown) - limit} more patterns)" if len(shown) > limit else "")
