"""Image-folder datasets, robust image decoding and the registry of the project's datasets.

Any folder laid out as ``ROOT/<split>/<class>/<image>`` or ``ROOT/<class>/<image>`` is a dataset. Class order is
the sorted folder names (the paper's ``ImageFolder`` convention), so class index ``c`` always means
``class_names[c]``. Folders are listed with :func:`os.scandir` at a fixed depth (split → class → file): nothing is
walked recursively, so symbolic-link loops cannot hang the listing. Nothing is ever written into a data folder.

Decoding (:func:`load_rgb`) turns every file Pillow can read into an 8-bit RGB image, with these documented
choices (they are part of the preprocessing, see :data:`DECODE_DESCRIPTION`, which embedding caches include in
their key):

- EXIF orientation is applied (``ImageOps.exif_transpose``), so a phone photo stored sideways is seen upright.
- Transparency (RGBA, LA, palette with a transparent colour) is composited on **black**: medical images (cells,
  fundus, X-ray) have black surroundings, so transparent margins should look like them.
- 16/32-bit integer images (``I;16``, ``I;16B``, ``I``) are scaled to 8 bits by their *bit range*: values are
  divided by ``2**b - 1`` where ``b`` is the smallest bit depth (≥ 8) that holds the image's maximum, so a 12-bit
  X-ray stored in 16 bits uses the full 8-bit range instead of looking black, and nothing is clipped. Images with
  negative values and float images (``F``) are min–max scaled.
- Animated / multi-page files (GIF, WebP, TIFF) use their first frame.
- Images above ``PIL.Image.MAX_IMAGE_PIXELS`` pixels are refused (decompression-bomb guard), never decoded.

Failures raise :class:`kplib.errors.ImageDecodeError` with a human reason ("file is empty (0 bytes)",
"truncated image data", "not an image file", ...). :func:`scan_images` checks a whole dataset up front: in
``"stop"`` mode it raises before any computation and lists the bad files; in ``"skip"`` mode it returns the readable
subset and a :class:`DecodeReport`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import struct
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import Tensor

from . import config
from .errors import ImageDecodeError, KPLInputError

log = logging.getLogger("kplib")

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
ON_ERROR_MODES = ("stop", "skip")

#: What :func:`load_rgb` does to pixels; include it in embedding-cache namespaces so a change re-encodes.
DECODE_DESCRIPTION = (
    "kplib.data.load_rgb v1: first frame; EXIF transpose; alpha composited on black; "
    "16/32-bit integer scaled by bit range (2**b-1, b>=8 holds max); float/negative min-max; RGB uint8"
)


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------

def _describe_head(data: bytes) -> str:
    head = data[:16]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"it starts with text {head.decode('ascii', 'replace')!r}"
    return f"it starts with bytes {head[:8].hex(' ')}"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageDecodeError(path, "broken symbolic link (its target does not exist)") from None
        raise ImageDecodeError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied (cannot read the file)") from None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise ImageDecodeError(path, "symbolic link loop (the link points back to itself)") from None
        raise ImageDecodeError(path, f"cannot read the file ({exc.strerror or exc})") from None


def _bomb_reason(width: int, height: int) -> str:
    return (
        f"image too large: {width}×{height} = {width * height:,} pixels exceeds the decompression-bomb limit "
        f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,}; it was not decoded. If the file is trusted, "
        f"raise PIL.Image.MAX_IMAGE_PIXELS or downscale the image"
    )


def _scale_high_depth(im: Image.Image) -> Image.Image:
    """16/32-bit or float single-channel image → 8-bit ``L`` without clipping (see module docstring)."""
    arr = np.asarray(im)
    if arr.ndim != 2:  # pragma: no cover - Pillow's high-depth modes are single channel
        raise ValueError(f"unexpected array shape {arr.shape} for mode {im.mode}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if im.mode != "F" and lo >= 0:
        bits = max(8, int(hi).bit_length())
        scaled = arr * (255.0 / (2**bits - 1))
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _composite_on_black(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        return _composite_on_black(im)
    if mode == "P":
        if "transparency" in im.info:
            return _composite_on_black(im)
        return im.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _scale_high_depth(im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """Decode one image file into an 8-bit RGB ``PIL.Image`` (fully loaded, file closed).

    ``data``: the file's bytes when the caller already read them (e.g. to hash them for the embedding cache); the
    file is then not read again and ``path`` is only used in messages. Raises :class:`ImageDecodeError` with a
    human reason for empty, truncated, corrupt, oversized or non-image files.

    The size guard is checked explicitly (``width * height > PIL.Image.MAX_IMAGE_PIXELS``) besides turning
    Pillow's ``DecompressionBombWarning`` into an error, so it holds even when several threads change the warnings
    filters at once. Do not set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``: truncated files would then decode silently
    (a warning is logged if it is set).
    """
    path = Path(path)
    if data is None:
        data = _read_bytes(path)
    if len(data) == 0:
        raise ImageDecodeError(path, "file is empty (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images will not be detected")
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and twice that: make it an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and im.width * im.height > limit:  # independent of the warnings filter state
                    raise ImageDecodeError(path, _bomb_reason(im.width, im.height))
                im.load()
                try:
                    oriented = ImageOps.exif_transpose(im)
                except Exception as exc:  # corrupt EXIF must not cost the pixels; say so
                    log.warning("ignoring unreadable EXIF orientation of %s (%s)", path, exc)
                    oriented = im
                rgb = _to_rgb(oriented)
                if rgb is im:
                    rgb = im.copy()  # detach from the closing file object
                rgb.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            path,
            f"image too large, refused by the decompression-bomb guard ({exc}); it was not decoded. If the file is "
            f"trusted, raise PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS:,}) or downscale the image",
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            path, f"not an image file (Pillow cannot identify the format; {_describe_head(data)})"
        ) from None
    except OSError as exc:
        text = str(exc)
        if "truncated" in text:
            raise ImageDecodeError(path, f"truncated image data (the file ends early: {text})") from None
        raise ImageDecodeError(path, f"corrupt image data ({text})") from None
    except (SyntaxError, ValueError, TypeError, IndexError, EOFError, struct.error) as exc:
        raise ImageDecodeError(path, f"corrupt image data ({type(exc).__name__}: {exc})") from None
    except MemoryError:
        raise ImageDecodeError(path, "not enough memory to decode the image") from None
    if rgb.width < 1 or rgb.height < 1:  # pragma: no cover - Pillow refuses these already
        raise ImageDecodeError(path, f"image has no pixels ({rgb.width}×{rgb.height})")
    return rgb


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------

@dataclass
class DecodeReport:
    """Outcome of :func:`scan_images`: which files could not be decoded and why."""

    n_checked: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def n_ok(self) -> int:
        return self.n_checked - len(self.skipped)

    def summary(self, max_files: int = 10) -> str:
        if not self.skipped:
            return f"all {self.n_checked} images decoded"
        lines = [f"{len(self.skipped)} of {self.n_checked} images could not be decoded:"]
        lines += [f"  {p}: {reason}" for p, reason in self.skipped[:max_files]]
        if len(self.skipped) > max_files:
            lines.append(f"  ... and {len(self.skipped) - max_files} more")
        return "\n".join(lines)


@dataclass
class ImageFolderDataset:
    """Image paths and integer labels of one image folder; class ``c`` is ``class_names[c]`` (sorted folders)."""

    root: Path
    class_names: list[str]
    display_names: list[str]
    paths: list[Path]
    labels: Tensor                       # (N,) int64
    name: str = ""
    split: str | None = None
    limit_per_class: int | None = None
    seed: int = 0
    decode_report: DecodeReport | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self) -> dict[str, int]:
        """Images per class, in class order."""
        per = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, per))

    def describe(self) -> dict:
        """Plain-dict summary for tables and provenance records."""
        return {
            "name": self.name,
            "root": str(self.root),
            "split": self.split,
            "n_images": len(self.paths),
            "n_classes": len(self.class_names),
            "class_names": list(self.class_names),
            "display_names": list(self.display_names),
            "counts": self.counts(),
            "limit_per_class": self.limit_per_class,
            "seed": self.seed,
            "skipped": [] if self.decode_report is None else [(str(p), r) for p, r in self.decode_report.skipped],
        }

    def subset(self, indices: Sequence[int] | Tensor) -> "ImageFolderDataset":
        """A dataset with only the given image indices (class list unchanged)."""
        idx = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.long)
        return replace(self, paths=[self.paths[i] for i in idx.tolist()], labels=self.labels[idx].clone())


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _subdirs(folder: Path) -> list[os.DirEntry]:
    """Visible sub-folders (directory symlinks count, but are never descended past this fixed depth)."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise KPLInputError(f"cannot list folder {folder}: {exc.strerror or exc}") from None
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        try:
            if entry.is_dir():
                out.append(entry)
        except OSError as exc:  # symlink loop / broken link at folder level
            log.warning("ignoring %s: %s", entry.path, exc.strerror or exc)
    return sorted(out, key=lambda e: e.name)


def _image_files(folder: Path) -> tuple[list[Path], int, int]:
    """(image paths sorted by name, n non-image files ignored, n sub-folders ignored) directly inside ``folder``."""
    images, other, dirs = [], 0, 0
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise KPLInputError(f"cannot list class folder {folder}: {exc.strerror or exc}") from None
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        is_image_name = Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
        try:
            is_dir = entry.is_dir()
        except OSError:  # symlink loop: not a folder we can use; if named like an image, decoding reports it
            is_dir = False
        if is_dir:
            dirs += 1
        elif is_image_name:
            images.append(Path(entry.path))
        else:
            other += 1
    return sorted(images, key=lambda p: p.name), other, dirs


def _has_images(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(
                not _is_hidden(e.name) and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in it
            )
    except OSError:
        return False


def _resolve_split(root: Path, split: str | None) -> tuple[Path, str | None]:
    if split is not None:
        folder = root / split
        if not folder.is_dir():
            found = [e.name for e in _subdirs(root)]
            raise KPLInputError(
                f"split folder {folder} not found (split={split!r}); sub-folders of {root}: {found[:10]}. "
                f"Pass split=None for a ROOT/<class>/<image> layout or to auto-detect a single split."
            )
        return folder, split
    subdirs = _subdirs(root)
    if not subdirs:
        return root, None  # reported below as "no class folders"
    if any(_has_images(Path(e.path)) for e in subdirs):
        return root, None  # ROOT/<class>/<image>
    splits = [e for e in subdirs if any(_has_images(Path(s.path)) for s in _subdirs(Path(e.path)))]
    if len(splits) == 1:
        return Path(splits[0].path), splits[0].name
    if not splits:
        return root, None
    raise KPLInputError(
        f"{root} holds several splits {[e.name for e in splits]}; pass split=<one of them> to load_image_folder"
    )


def _display_list(class_names: list[str], display_names, folder: Path) -> list[str]:
    if display_names is None:
        return list(class_names)
    if isinstance(display_names, Mapping):
        unknown = sorted(set(display_names) - set(class_names))
        if unknown:
            raise KPLInputError(
                f"display_names has keys that are not class folders of {folder}: {unknown}; "
                f"class folders are {class_names}"
            )
        out = [str(display_names.get(c, c)) for c in class_names]
    else:
        out = [str(d) for d in display_names]
        if len(out) != len(class_names):
            raise KPLInputError(
                f"display_names has {len(out)} entries but {folder} has {len(class_names)} classes "
                f"{class_names}; give one per class in sorted folder order, or a dict folder → name"
            )
    for c, d in zip(class_names, out):
        if not d.strip():
            raise KPLInputError(f"display_names gives an empty name for class {c!r}")
    return out


def load_image_folder(
    root: str | os.PathLike,
    split: str | None = "val",
    display_names: Mapping[str, str] | Sequence[str] | None = None,
    limit_per_class: int | None = None,
    seed: int = 0,
    on_error: str | None = None,
    name: str | None = None,
) -> ImageFolderDataset:
    """List an image folder as a dataset (method doc: the unlabeled test set; labels only for evaluation).

    ``split``: sub-folder holding the class folders (``"val"`` by default, as KPL's ``Main.py`` reads); ``None``
    auto-detects ``ROOT/<class>/<image>`` or a single ``ROOT/<split>/<class>/<image>``.
    ``display_names``: dict folder → name used in prompts (missing classes keep their folder name), or a list in
    class order. ``limit_per_class``: keep a seeded random subset of at most this many images per class
    (``random.Random(seed).sample(sorted(files), k)`` per class, then sorted — the rule the shared data used).
    ``on_error``: ``None`` only lists files (decoding happens later, e.g. while encoding); ``"stop"`` / ``"skip"``
    also decode every image now via :func:`scan_images`.

    An empty class folder is an error naming it: that class could not be evaluated. Hidden (dot) files and
    folders and non-image files are ignored; sub-folders inside a class folder are not descended into.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise KPLInputError(f"dataset folder {root} does not exist or is not a folder (root={str(root)!r})")
    if limit_per_class is not None and (
        isinstance(limit_per_class, bool) or not isinstance(limit_per_class, (int, np.integer)) or limit_per_class < 1
    ):
        raise KPLInputError(f"limit_per_class must be a positive integer or None, got {limit_per_class!r}")
    if on_error is not None and on_error not in ON_ERROR_MODES:
        raise KPLInputError(f"on_error must be one of {ON_ERROR_MODES} or None, got {on_error!r}")

    folder, split_used = _resolve_split(root, split)
    class_entries = _subdirs(folder)
    if not class_entries:
        loose = _has_images(folder)
        hint = " (images lie directly in it: put them in <class>/ sub-folders)" if loose else ""
        raise KPLInputError(f"no class folders found in {folder}{hint}; expected {folder}/<class>/<image>")
    class_names = [e.name for e in class_entries]
    if len(class_names) < 2:
        raise KPLInputError(
            f"{folder} has only one class folder {class_names}; classification needs at least 2 classes "
            f"(is root pointing at a class folder instead of the dataset folder?)"
        )
    displays = _display_list(class_names, display_names, folder)

    paths: list[Path] = []
    labels: list[int] = []
    for c, entry in enumerate(class_entries):
        files, n_other, n_dirs = _image_files(Path(entry.path))
        if not files:
            extra = []
            if n_other:
                extra.append(f"{n_other} non-image file(s)")
            if n_dirs:
                extra.append(f"{n_dirs} sub-folder(s), which are not searched")
            detail = f" (it has {' and '.join(extra)})" if extra else ""
            raise KPLInputError(
                f"class folder {entry.path} has no image files{detail}; every class needs images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}) directly inside it. Remove the folder or add images."
            )
        if n_other:
            log.info("ignored %d non-image file(s) in %s", n_other, entry.path)
        if limit_per_class is not None and len(files) > limit_per_class:
            files = sorted(random.Random(seed).sample(files, int(limit_per_class)), key=lambda p: p.name)
        paths.extend(files)
        labels.extend([c] * len(files))

    dataset = ImageFolderDataset(
        root=root,
        class_names=class_names,
        display_names=displays,
        paths=paths,
        labels=torch.tensor(labels, dtype=torch.long),
        name=name or root.name,
        split=split_used,
        limit_per_class=None if limit_per_class is None else int(limit_per_class),
        seed=seed,
    )
    if on_error is not None:
        dataset, _ = scan_images(dataset, on_error=on_error)
    return dataset


def scan_images(
    dataset: ImageFolderDataset, on_error: str = "stop", progress: bool = False
) -> tuple[ImageFolderDataset, DecodeReport]:
    """Decode every image of ``dataset`` once, before any computation.

    ``"stop"``: if any file fails, raise :class:`ImageDecodeError` for the first one, listing the others in the
    message (attribute ``report`` holds them all). ``"skip"``: return the dataset without the bad files (a warning
    is logged; the report is also stored on ``dataset.decode_report``). A class left with no readable image is an
    error in both modes.
    """
    if on_error not in ON_ERROR_MODES:
        raise KPLInputError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}")
    from tqdm.auto import tqdm

    bad: list[tuple[Path, str]] = []
    keep: list[int] = []
    for i, path in enumerate(tqdm(dataset.paths, desc="checking images", disable=not progress, unit="img")):
        try:
            load_rgb(path)
        except ImageDecodeError as exc:
            bad.append((path, exc.reason))
        else:
            keep.append(i)
    report = DecodeReport(n_checked=len(dataset.paths), skipped=bad)
    if bad and on_error == "stop":
        first, reason = bad[0]
        more = ""
        if len(bad) > 1:
            others = "; ".join(f"{p.name}: {r}" for p, r in bad[1:6])
            more = f" — and {len(bad) - 1} more bad file(s): {others}{' ...' if len(bad) > 6 else ''}"
        err = ImageDecodeError(
            first, f"{reason}{more}. Fix or remove the file(s), or pass on_error='skip' to leave them out"
        )
        err.report = report  # type: ignore[attr-defined]
        raise err
    out = dataset.subset(keep) if bad else dataset
    out.decode_report = report
    if bad:
        counts = out.counts()
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise KPLInputError(
                f"no readable image left in class(es) {empty} of {dataset.root} after skipping bad files:\n"
                + report.summary()
            )
        log.warning("skipped unreadable images in %s\n%s", dataset.root, report.summary())
    return out, report


# --------------------------------------------------------------------------------------------------------------
# Registry of the project's datasets (../shared/data)
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    """One dataset of the shared data folder: where it lives and how it relates to the KPL paper."""

    name: str
    folder: str                          # under kplib.config.data_root()
    display_names: dict[str, str]        # folder name → name used in prompts (empty: read display_names_file)
    modality: str
    paper_dataset: str                   # the KPL paper's dataset, or what this substitutes for
    kb: str | None                       # curated knowledge base name (kplib/kbs/<kb>.json); None = none curated
    citation: str
    split: str = "val"
    display_names_file: str | None = None  # JSON folder → name inside the dataset folder (imagenet_sample)
    published_descriptors: str | None = None  # file under kplib.config.descriptors_root() that fits this task

    def resolve_display_names(self, folder: Path) -> dict[str, str]:
        if self.display_names_file is None:
            return dict(self.display_names)
        file = folder / self.display_names_file
        try:
            names = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise KPLInputError(f"cannot read class names of dataset {self.name!r} from {file}: {exc}") from None
        if not isinstance(names, dict):
            raise KPLInputError(f"{file} must hold a JSON object folder → class name")
        return {str(k): str(v) for k, v in names.items()}


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            name="brain_tumor_mri",
            folder="brain_tumor_mri",
            display_names={
                "glioma": "glioma",
                "meningioma": "meningioma",
                "notumor": "brain with no tumor",
                "pituitary": "pituitary tumor",
            },
            modality="brain MRI",
            paper_dataset="KPL brain tumour MRI (Nickparvar Kaggle set, original Testing split)",
            kb="brain_tumor_mri",
            citation="M. Nickparvar, Brain Tumor MRI Dataset, Kaggle (2021)",
        ),
        DatasetInfo(
            name="malaria_cells",
            folder="malaria_cells",
            display_names={
                "Parasitized": "parasitized red blood cell",
                "Uninfected": "uninfected red blood cell",
            },
            modality="thin blood smear microscopy (single-cell crops)",
            paper_dataset="KPL malaria cells (NIH/NLM), small subset",
            kb="malaria_cells",
            citation="Rajaraman et al., PeerJ 6:e4568 (2018)",
        ),
        DatasetInfo(
            name="chest_xray_pneumonia",
            folder="chest_xray_pneumonia",
            display_names={"NORMAL": "normal chest X-ray", "PNEUMONIA": "pneumonia chest X-ray"},
            modality="paediatric chest X-ray",
            paper_dataset="not in KPL (extra chest X-ray task)",
            kb="chest_xray_pneumonia",
            citation="Kermany et al., Cell 172(5):1122-1131 (2018)",
            published_descriptors="zero_shot_unseen_pulmonary/multixpert_descriptors.json",
        ),
        DatasetInfo(
            name="tb_cxr_nitrd_da",
            folder="tb_cxr_nitrd_da",
            display_names={"normal": "normal chest X-ray", "tuberculosis": "tuberculosis chest X-ray"},
            modality="chest X-ray",
            paper_dataset="substitute for KPL Shenzhen / Montgomery tuberculosis chest X-rays",
            kb="tb_cxr_nitrd_da",
            citation="Chauhan et al., PLoS ONE 9(11):e112980 (2014)",
            published_descriptors="zero_shot_unseen_pulmonary/dk4o_descriptors.json",  # its NLM (TB) set
        ),
        DatasetInfo(
            name="eye_diseases_4class",
            folder="eye_diseases_4class",
            display_names={
                "cataract": "cataract",
                "diabetic_retinopathy": "diabetic retinopathy",
                "glaucoma": "glaucoma",
                "normal": "normal fundus",
            },
            modality="colour fundus photograph",
            paper_dataset="substitute for KPL cataract (yiweichen04/retina_dataset)",
            kb="eye_diseases_4class",
            citation="Kaggle 'Eye Diseases Classification' (gunavenkatdoddi), pooling ODIR-5K, EyePACS, retina_dataset",
        ),
        DatasetInfo(
            name="aptos2019_dr_gaussian",
            folder="aptos2019_dr_gaussian",
            display_names={
                "No_DR": "healthy retina with no diabetic retinopathy",
                "Mild": "mild diabetic retinopathy",
                "Moderate": "moderate diabetic retinopathy",
                "Severe": "severe diabetic retinopathy",
                "Proliferate_DR": "proliferative diabetic retinopathy",
            },
            modality="fundus photograph (Gaussian-filtered, Graham 2015)",
            paper_dataset="substitute for KPL IDRiD (same 5-grade diabetic-retinopathy scale)",
            kb="aptos2019_dr_gaussian",
            citation="APTOS 2019 Blindness Detection, Kaggle (2019); preprocessing after B. Graham (2015)",
        ),
        DatasetInfo(
            name="imagenet_sample",
            folder="imagenet_sample",
            display_names={},
            modality="natural photographs",
            paper_dataset="not in KPL (natural-image smoke test, 1 image per ImageNet class)",
            kb=None,
            citation="Russakovsky et al., IJCV 115:211-252 (2015)",
            display_names_file="class_names.json",
            published_descriptors="classify_by_description/descriptors_imagenet.json",
        ),
    ]
}


def get_dataset(
    name: str, limit_per_class: int | None = None, seed: int = 0, on_error: str | None = None
) -> ImageFolderDataset:
    """Load a registered dataset from ``kplib.config.data_root()`` (``$KPL_DATA_ROOT``) with its display names."""
    if name not in DATASETS:
        raise KPLInputError(f"unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
    info = DATASETS[name]
    folder = config.data_root() / info.folder
    if not folder.is_dir():
        raise KPLInputError(
            f"dataset {name!r} not found: {folder} does not exist. Put it there or set KPL_DATA_ROOT to the folder "
            f"that holds {info.folder}/{info.split}/<class>/<image>"
        )
    return load_image_folder(
        folder,
        split=info.split,
        display_names=info.resolve_display_names(folder),
        limit_per_class=limit_per_class,
        seed=seed,
        on_error=on_error,
        name=info.name,
    )


def available_datasets() -> list[str]:
    """Registered datasets whose folder exists under the data root (empty if the data root is missing)."""
    try:
        root = config.data_root()
    except KPLInputError:
        return []
    return [n for n, info in DATASETS.items() if (root / info.folder / info.split).is_dir()]
