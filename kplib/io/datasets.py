"""Image folders as datasets, and the registry of the project's datasets (``datasets.json``).

**Labelled** (the paper's ``ImageFolder``): ``ROOT/<class>/<image>`` or ``ROOT/<split>/<class>/<image>``, classes
the sorted folder names; files not directly inside a class folder are left out with a warning. **Unlabelled** (only
when asked: ``labelled=False`` or ``classes=[...]``, so labels are never lost silently): every image under ``ROOT``.

Images are files with an :data:`~kplib.io.images.IMAGE_EXTENSIONS` extension (any case) or the DICOM marker; hidden
files and folders are ignored. Listing never writes and never loops on folder links. Aliased class folders (symbolic
links to one folder) are refused unless ``allow_aliases=True``, empty ones unless ``skip_empty=True``. Names that are
not UTF-8 keep Python's lone surrogates; :func:`display_path` prints them reversibly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from .. import paths
from ..errors import ImageDecodeError, KPLInputError, fix
from ..params import Interval, check
from .dicom import is_dicom
from .images import IMAGE_EXTENSIONS

log = logging.getLogger("kplib")
REGISTRY_FILE = Path(__file__).with_name("datasets.json")
_ESCAPED = re.compile("[\\\\\x00-\x1f\x7f\udc80-\udcff]")  # backslash, control characters, undecodable bytes


def display_path(path, root=None) -> str:
    """The printable form of ``path``, relative to ``root`` when inside it, with ``/`` separators; reversible
    (:func:`parse_display_path`): an undecodable byte (lone surrogate U+DCNN) or control character becomes ``\\xNN``,
    a backslash ``\\\\``."""
    text = os.fspath(path)
    if root is not None:
        rel = os.path.relpath(text, root)
        text = text if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel
    return _ESCAPED.sub(lambda m: "\\\\" if m.group() == "\\" else f"\\x{ord(m.group()) & 0xFF:02x}",
                        text.replace(os.sep, "/"))


def parse_display_path(text: str, root=None) -> Path:
    """Inverse of :func:`display_path`: the path (joined to ``root`` when given) with its original bytes."""
    name = re.sub(r"\\(\\|x[0-9a-fA-F]{2})", lambda m: "\\" if m.group(1) == "\\" else chr(
        (code := int(m.group(1)[1:], 16)) + (0xDC00 if code >= 0x80 else 0)), text)
    return Path(root) / name if root is not None else Path(name)


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (:data:`~kplib.io.images.IMAGE_EXTENSIONS`)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop: not a folder we can use
        return False


def is_image_entry(entry: os.DirEntry) -> bool:
    """An image by name (not a folder), or a regular file of another name with the DICOM marker."""
    if is_image_name(entry.name):
        return not _is_dir(entry)  # a link loop named like an image is listed: reading it reports the loop
    try:
        if not entry.is_file() or entry.stat().st_size < 132:
            return False
        with open(entry.path, "rb") as fh:
            return is_dicom(fh.read(132))
    except OSError:
        return False


def visible_entries(folder: Path) -> list[os.DirEntry]:
    """Entries of ``folder`` without hidden ones, sorted by name; a folder that cannot be listed is an error."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise KPLInputError(f"cannot list folder {display_path(folder)}: {exc.strerror or exc}") from None


def _has_images(folder) -> bool:
    with contextlib.suppress(KPLInputError):
        return any(is_image_entry(e) for e in visible_entries(folder))
    return False


# ------------------------------------------------------------------------------------------------ the dataset
@dataclass
class ImageFolder:
    """The images of one folder; ``labels`` (N,) int64 index ``class_names``, or ``None`` for unlabelled images."""

    root: Path
    class_names: list[str]
    display_names: list[str]
    paths: list[Path]
    labels: Tensor | None
    name: str = ""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    split: str | None = None
    limit_per_class: int | None = None
    seed: int = 0
    dropped_classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self) -> dict[str, int]:
        """Images per class in class order (empty for unlabelled images)."""
        if self.labels is None:
            return {}
        return dict(zip(self.class_names, torch.bincount(self.labels, minlength=self.num_classes).tolist()))

    def subset(self, indices: Sequence[int] | Tensor) -> ImageFolder:
        """The same folder with only the given images (class list unchanged)."""
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        labels = None if self.labels is None else self.labels[idx]
        return replace(self, paths=[self.paths[i] for i in idx], labels=labels)

    def without(self, bad: Sequence[tuple[Path, str]], skip_empty: bool = False) -> ImageFolder:
        """The folder without the ``bad`` (path, reason) files, which join ``skipped`` (each file once).

        A class left without images is an error naming it, unless ``skip_empty`` drops it with a warning.
        """
        reasons = {Path(p): r for p, r in bad}
        out = self.subset([i for i, p in enumerate(self.paths) if p not in reasons])
        known = {p for p, _ in self.skipped}
        out.skipped = [*self.skipped, *((p, r) for p, r in reasons.items() if p not in known)]
        empty = [c for c, n in out.counts().items() if n == 0]
        if not empty:
            return out
        if not skip_empty:
            raise KPLInputError(f"no readable image left in class(es) {empty} of {display_path(self.root)} after "
                                f"leaving out unreadable files:\n{out.skipped_summary()}\nFix the files, or drop the "
                                f"classes {fix(cli='--skip-empty-classes', python='skip_empty=True')}")
        log.warning("dropped class(es) %s of %s: no readable images", empty, display_path(self.root))
        keep = [c for c, name in enumerate(self.class_names) if name not in empty]
        _check_classes([self.class_names[c] for c in keep], self.root)
        return replace(out, class_names=[self.class_names[c] for c in keep],
                       display_names=[self.display_names[c] for c in keep],
                       labels=torch.tensor([keep.index(y) for y in out.labels.tolist()], dtype=torch.long),
                       dropped_classes=[*self.dropped_classes, *empty])

    def skipped_summary(self, max_files: int | None = 20) -> str:
        """Each skipped file once, with its full path and reason."""
        shown = self.skipped[:max_files]
        more = [f"  ... and {len(self.skipped) - len(shown)} more"] * (len(shown) < len(self.skipped))
        lines = [f"skipped {len(self.skipped)} unreadable image(s):", *(f"  {display_path(p)}: {r}" for p, r in shown)]
        return "\n".join(lines + more) if self.skipped else "no image skipped"

    def describe(self) -> dict:
        """A JSON-ready summary (paths in :func:`display_path` form) for tables and provenance."""
        return {
            "name": self.name, "root": display_path(self.root), "split": self.split,
            "layout": "class folders" if self.labelled else "unlabelled", "n_images": len(self),
            "n_classes": self.num_classes, "class_names": [display_path(c) for c in self.class_names],
            "display_names": [display_path(d) for d in self.display_names],
            "counts": {display_path(c): n for c, n in self.counts().items()},
            "limit_per_class": self.limit_per_class, "seed": self.seed, "dropped_classes": list(self.dropped_classes),
            "skipped": [[display_path(p), r] for p, r in self.skipped],
        }


def unreadable_error(bad: Sequence[tuple[Path, str]], n_checked: int) -> ImageDecodeError:
    """One error for all unreadable files: each with its full path and reason (20 at most), and the fix."""
    also = "; ".join(f"{display_path(p)}: {r}" for p, r in bad[1:20]) + " ..." * (len(bad) > 20)
    tail = f" — {len(bad)} of {n_checked} images cannot be read; also {also}" if len(bad) > 1 else ""
    err = ImageDecodeError(bad[0][0], f"{bad[0][1]}{tail}. Fix or remove the file(s), or leave them out "
                                      f"{fix(cli='--on-error skip', python='on_error=' + repr('skip'))}")
    err.bad = list(bad)
    return err


# ------------------------------------------------------------------------------------------------ listing
def _check_classes(class_names: list[str], folder: Path) -> None:
    if len(class_names) < 2:
        raise KPLInputError(f"{folder} has only {len(class_names)} class folder(s) {class_names}; classification "
                            "needs at least 2 classes (is the path a class folder instead of the dataset folder?)")


def _display_list(class_names: list[str], display_names, folder: Path) -> list[str]:
    if isinstance(display_names, Mapping):
        if unknown := sorted(set(display_names) - set(class_names)):
            raise KPLInputError(f"display_names has keys that are not classes of {display_path(folder)}: {unknown}; "
                                f"the classes are {class_names}")
        display_names = [display_names.get(c, c) for c in class_names]
    out = [str(d) for d in (class_names if display_names is None else display_names)]
    if len(out) != len(class_names):
        raise KPLInputError(f"display_names has {len(out)} entries but {display_path(folder)} has {len(class_names)} "
                            f"classes {class_names}; give one per class in sorted order, or a dict folder -> name")
    if empty := [c for c, d in zip(class_names, out) if not d.strip()]:
        raise KPLInputError(f"display_names gives an empty name for class {empty[0]!r}")
    return out


def _resolve_split(root: Path, split: str | None) -> tuple[Path, str | None]:
    """The folder holding the class folders: ``root/split``, or found (``ROOT/<class>`` or one ``ROOT/<split>``)."""
    subdirs = [e for e in visible_entries(root) if _is_dir(e)]
    if split is not None:
        if not (root / split).is_dir():
            raise KPLInputError(f"split folder {root / split} not found (split={split!r}); sub-folders of {root}: "
                                f"{[e.name for e in subdirs][:10]}. Leave the split out for ROOT/<class>/<image> or "
                                f"to find a single split {fix(cli='no --split', python='split=None')}")
        return root / split, split
    splits = [e for e in subdirs if any(_is_dir(s) and _has_images(s.path) for s in visible_entries(e.path))]
    if not subdirs or (any(_has_images(e.path) for e in subdirs) and not (len(subdirs) == 1 and splits)):
        return root, None  # ROOT/<class>/<image>; a lone sub-folder holding image folders is a split
    if len(splits) > 1:
        raise KPLInputError(f"{root} holds several splits {[e.name for e in splits]}; choose one "
                            f"{fix(cli='--split NAME', python='split=NAME')}")
    return (Path(splits[0].path), splits[0].name) if splits else (root, None)


def class_folder_aliases(folders: Sequence[Path]) -> list[list[Path]]:
    """Groups of folders that resolve to the same place (same device and inode): symbolic-link aliases."""
    seen: dict[tuple[int, int], list[Path]] = {}
    for f in folders:
        with contextlib.suppress(OSError):
            st = os.stat(f)
            seen.setdefault((st.st_dev, st.st_ino), []).append(Path(f))
    return [g for g in seen.values() if len(g) > 1]


def _sample(files: list[Path], limit: int | None, seed: int) -> list[Path]:
    """The shared data's rule: ``random.Random(seed).sample(sorted(files), k)``, then sorted."""
    return files if limit is None or len(files) <= limit else sorted(random.Random(seed).sample(files, limit))


def _class_files(folder: Path, limit, seed, skip_empty, allow_aliases) -> dict[str, list[Path]]:
    """Every class folder's images (empty folders are an error, or kept without files when skipped)."""
    entries = visible_entries(folder)
    classes, loose = [e for e in entries if _is_dir(e)], sum(is_image_entry(e) for e in entries if not _is_dir(e))
    if not classes:
        hint = fix(cli="--unlabelled or --classes a,b", python="labelled=False or classes=[...]")
        raise KPLInputError(f"no class folders in {display_path(folder)} (expected <folder>/<class>/<image>)"
                            + (f"; it has images: if they are unlabelled, say so {hint}" if loose else ""))
    if loose:
        log.warning("%d image file(s) lie directly in %s, outside any class folder: not used", loose,
                    display_path(folder))
    for group in class_folder_aliases([Path(e.path) for e in classes]):
        text = f"class folders {' and '.join(map(display_path, group))} are the same folder (a symbolic-link alias)"
        if not allow_aliases:
            raise KPLInputError(f"{text}: every image in it would count under {len(group)} labels. Remove the alias, "
                                f"or use it anyway {fix(cli='--allow-aliases', python='allow_aliases=True')}")
        log.warning("%s: its images count under %d labels", text, len(group))
    files, empty = {}, []
    for e in classes:
        inside = visible_entries(Path(e.path))
        found = [Path(f.path) for f in inside if is_image_entry(f)]
        n_dirs = sum(_is_dir(f) for f in inside)
        n_other = len(inside) - len(found) - n_dirs
        if n_dirs:
            log.warning("class folder %s has %d sub-folder(s); images in them are not used", display_path(e.path),
                        n_dirs)
        files[e.name] = _sample(found, limit, seed)
        if not found:
            empty.append(f"class folder {display_path(e.path)} has no image files (it has {n_other} non-image "
                         f"file(s) and {n_dirs} sub-folder(s))")
    if empty and not skip_empty:
        raise KPLInputError(f"{'; '.join(empty)}. Every class needs images directly inside its folder; add images, "
                            f"or drop the empty class(es) {fix(cli='--skip-empty-classes', python='skip_empty=True')}")
    for text in empty:
        log.warning("dropped: %s", text)
    return files


def _unlabelled_files(folder) -> list[Path]:
    """Every image under ``folder`` at any depth, sorted by path; folder links are not followed (no loops)."""
    return [p for e in visible_entries(folder) for p in (
        _unlabelled_files(e.path) if e.is_dir(follow_symlinks=False) else [Path(e.path)] * is_image_entry(e))]


def load_folder(root, split: str | None = None, display_names=None, limit_per_class: int | None = None,
                seed: int = 0, classes: Sequence[str] | None = None, skip_empty: bool = False,
                allow_aliases: bool = False, labelled: bool | None = None, name: str | None = None) -> ImageFolder:
    """List an image folder as a dataset (module docstring: layouts, which files are images, guards).

    Parameters
    ----------
    split : str, optional
        Sub-folder holding the class folders (e.g. ``"val"``); ``None`` finds ``ROOT/<class>`` or a single split.
    display_names : dict or list, optional
        Names used in prompts: dict class -> name (others keep their name), or a list in class order.
    limit_per_class : int, optional
        At most this many images per class (of the whole folder when unlabelled), by the shared data's rule
        ``sorted(random.Random(seed).sample(sorted_files, limit))``.
    classes, labelled :
        ``labelled=False`` reads every image as unlabelled (classes from ``classes`` or later a knowledge base),
        ``True`` requires class folders; ``None`` (default) is unlabelled exactly when ``classes`` is given.
    skip_empty, allow_aliases : bool
        Drop empty class folders, accept aliased class folders (each with a warning) instead of failing.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise KPLInputError(f"dataset folder {root} does not exist or is not a folder")
    check("limit_per_class", limit_per_class, Interval(int, 1), none_ok=True)
    labelled = classes is None if labelled is None else labelled
    if labelled and classes is not None:
        raise KPLInputError("classes= names the classes of unlabelled images; a labelled folder takes its classes "
                            f"from its class folders {fix(cli='--classes without --labelled', python='labelled=None')}")
    common = {"root": root, "name": name or root.name, "seed": seed, "limit_per_class": limit_per_class}
    if not labelled:
        folder = _resolve_split(root, split)[0] if split is not None else root
        names = [str(c) for c in classes or []]
        if len(set(names)) != len(names) or any(not c.strip() for c in names) or len(names) == 1:
            raise KPLInputError(f"classes must be at least 2 distinct non-empty names, got {names}")
        files = _sample(_unlabelled_files(folder), limit_per_class, seed)
        if not files:
            raise KPLInputError(f"no image files found under {folder}")
        return ImageFolder(class_names=names, display_names=_display_list(names, display_names, folder),
                           paths=files, labels=None, split=split, **common)
    folder, split = _resolve_split(root, split)
    files = _class_files(folder, limit_per_class, seed, skip_empty, allow_aliases)
    displays = dict(zip(files, _display_list(list(files), display_names, folder)))
    names = [c for c, f in files.items() if f]
    _check_classes(names, folder)
    return ImageFolder(class_names=names, display_names=[displays[c] for c in names], split=split,
                       paths=[p for c in names for p in files[c]], **common,
                       labels=torch.tensor([y for y, c in enumerate(names) for _ in files[c]], dtype=torch.long),
                       dropped_classes=[c for c, f in files.items() if not f])


# ------------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class DatasetInfo:
    """One dataset of the shared data folder (``datasets.json``): where it lives, how it relates to the paper."""

    name: str
    folder: str                          # under kplib.paths.data_root()
    split: str
    display_names: dict[str, str]        # folder -> name used in prompts (empty: read display_names_file)
    modality: str
    paper_dataset: str                   # the KPL paper's dataset, or what this substitutes for
    kb: str | None                       # curated knowledge base (kplib/io/kbs/<kb>.json), or None
    citation: str
    display_names_file: str | None = None   # JSON folder -> name inside the dataset folder
    published_descriptors: str | None = None  # file under kplib.paths.descriptors_root() that fits this task


def registry() -> dict[str, DatasetInfo]:
    """The registered datasets (``kplib/io/datasets.json``), by name."""
    raw = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    return {name: DatasetInfo(name=name, **entry) for name, entry in raw.items()}


def load_dataset(name_or_folder, **options) -> ImageFolder:
    """A registered dataset (under ``$KPL_DATA_ROOT``, with its display names and split) or any image folder.

    ``options`` are those of :func:`load_folder`. A registered name wins over a folder of the same name in the
    working directory; write ``./name`` for the folder.
    """
    if isinstance(name_or_folder, ImageFolder):
        return name_or_folder
    text, known = os.fspath(name_or_folder), registry()
    info = known.get(text)
    if info is None:
        if Path(text).expanduser().is_dir():
            return load_folder(text, **options)
        raise KPLInputError(f"dataset {text!r} is neither a registered dataset ({sorted(known)}) nor an existing "
                            "folder (<folder>/<class>/<image>, <folder>/<split>/<class>/<image>, or unlabelled images)")
    folder = paths.data_root() / info.folder
    if not folder.is_dir():
        raise KPLInputError(f"dataset {text!r} not found: {folder} does not exist. Put it there or set KPL_DATA_ROOT "
                            f"to the folder that holds {info.folder}/{info.split}/<class>/<image>")
    options["split"], options["name"] = options.get("split") or info.split, options.get("name") or info.name
    if options.get("display_names") is None:
        options["display_names"] = dict(info.display_names)
        if info.display_names_file is not None:  # a JSON object folder -> prompt name, inside the dataset folder
            file = folder / info.display_names_file
            try:
                options["display_names"] = {str(k): str(v) for k, v in json.loads(file.read_text("utf-8")).items()}
            except (OSError, ValueError, AttributeError) as exc:
                raise KPLInputError(f"cannot read the class names of dataset {info.name!r} from {file} (a JSON object "
                                    f"folder -> class name): {exc}") from None
    return load_folder(folder, **options)
