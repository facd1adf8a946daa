"""Audit an image folder before trusting results on it: counts, formats, unreadable files, duplicates and leaks.

Public medical image sets often hold the same picture twice, sometimes under two labels (a labelling leak), and
exported folders pick up aliases, stray files and undecodable names. :func:`audit` reports class counts and the
imbalance :math:`\\max_c n_c / \\min_c n_c`, formats and sizes, unreadable files with their reasons, **exact
duplicates** (same SHA-256) within and across classes, **near-duplicates**, aliased and empty class folders, files
outside ``<class>/<image>`` and names that are not valid UTF-8.

Near-duplicates are pairs whose perceptual hashes (``imagehash.phash``: the signs of the 8×8 lowest DCT frequencies
of a 32×32 grey thumbnail against their median, 64 bits) differ in at most ``near_threshold`` bits. The default, 2,
catches re-encoded or resized copies while distinct pictures are rarely that close; pHash does not survive crops, so
near-duplicates are candidates to look at, not proof.

**Findings that matter** (exit code 1 of ``kpl audit``): unreadable files, exact duplicates across classes, aliased
and empty class folders; each changes what a run computes or measures. :func:`find_leaks` gives the cross-class
duplicates and aliases alone, fast, for the pipeline's warnings.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ImageDecodeError, KPLInputError, fix
from ..params import Interval
from .datasets import ImageFolder, class_folder_aliases, display_path, is_image_name, load_dataset
from .images import decode_image, read_bytes

NEAR_THRESHOLD = 2


@dataclass
class Leaks:
    """Cross-class exact duplicates (groups of paths with the same bytes under 2+ classes) and aliased folders."""

    cross_class: list[list[Path]] = field(default_factory=list)
    aliases: list[list[Path]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.cross_class or self.aliases)

    def message(self, max_groups: int = 10) -> str:
        lines = [f"class folders {' and '.join(map(display_path, g))} are the same folder" for g in self.aliases]
        if self.cross_class:
            lines.append(f"{len(self.cross_class)} group(s) of byte-identical images filed under different classes "
                         "(a labelling leak):")
            lines += ["  " + " = ".join(map(display_path, g)) for g in self.cross_class[:max_groups]]
            lines += [f"  ... and {len(self.cross_class) - max_groups} more"] * (len(self.cross_class) > max_groups)
        return "\n".join(lines)


def _aliases(ds: ImageFolder) -> list[list[Path]]:
    return class_folder_aliases([ds.root / (ds.split or "") / c for c in ds.class_names]) if ds.labelled else []


def find_leaks(dataset: ImageFolder, digests: Sequence | None = None) -> Leaks:
    """The cross-class exact duplicates and aliased class folders of a labelled dataset.

    ``digests``: one content digest per path (any hash of the bytes, e.g. the embedding store's keys), when the
    caller has them; otherwise files are read and hashed with SHA-256 (unreadable ones are left out).
    """
    if dataset.labels is None:
        return Leaks()
    groups, labels = defaultdict(list), dataset.labels.tolist()
    for i, p in enumerate(dataset.paths):
        with contextlib.suppress(ImageDecodeError):
            if (key := hashlib.sha256(read_bytes(p)).digest() if digests is None else digests[i]) is not None:
                groups[key].append(i)
    cross = [[dataset.paths[i] for i in g] for g in groups.values() if len({labels[i] for i in g}) > 1]
    return Leaks(cross_class=cross, aliases=_aliases(dataset))


@dataclass
class AuditReport:
    """What :func:`audit` found; paths are relative to ``root`` in :func:`~kplib.io.datasets.display_path` form."""

    root: str
    layout: str
    split: str | None
    n_images: int
    class_counts: dict[str, int]
    imbalance_ratio: float | None
    modes: dict[str, int]
    sizes: dict
    unreadable: list[tuple[str, str]]
    exact_duplicates: list[dict]
    near_duplicates: list[dict]
    near_threshold: int | None
    aliases: list[list[str]]
    empty_classes: list[str]
    outside_depth: list[str]
    non_utf8_names: list[str]

    def findings(self) -> list[str]:
        """The findings that matter (they make ``kpl audit`` exit with 1)."""
        cross = [g for g in self.exact_duplicates if g["cross_class"]]
        found = [(self.unreadable, "unreadable file(s)"), (cross, "group(s) of exact duplicates across classes"),
                 (self.aliases, "aliased class folder group(s)"), (self.empty_classes, "empty class folder(s)")]
        return [f"{len(items)} {text}" for items, text in found if items]

    @property
    def exit_code(self) -> int:
        return 1 if self.findings() else 0

    def to_dict(self) -> dict:
        return {**asdict(self), "findings": self.findings(), "exit_code": self.exit_code}

    def to_text(self, max_items: int = 20) -> str:
        def across(d: dict) -> str:
            return "ACROSS CLASSES " * d["cross_class"]

        counts = ", ".join(f"{c} {n}" for c, n in self.class_counts.items())
        ratio = f"; imbalance max/min = {self.imbalance_ratio:.2f}" if self.imbalance_ratio else ""
        lines = [f"audit of {self.root} ({self.layout}{', split ' + self.split if self.split else ''})",
                 f"images: {self.n_images}" + (f" in {len(self.class_counts)} classes ({counts}){ratio}"
                                               if self.class_counts else ""),
                 "formats: " + ", ".join(f"{m} {n}" for m, n in self.modes.items()),
                 f"sizes: {self.sizes.get('summary', '-')}"]
        near = (f"near-duplicate pairs (pHash within {self.near_threshold} of 64 bits)",
                [across(d) + f"{d['a']} ~ {d['b']} ({d['distance']} bits)" for d in self.near_duplicates])
        for title, items in [("unreadable files", [f"{p}: {r}" for p, r in self.unreadable]),
                             ("exact duplicate groups (same bytes)",
                              [across(g) + " = ".join(g["paths"]) for g in self.exact_duplicates]),
                             *[near] * (self.near_threshold is not None),
                             ("aliased class folders", [" = ".join(g) for g in self.aliases]),
                             ("empty class folders", self.empty_classes),
                             ("files outside <class>/<image>", self.outside_depth),
                             ("names that are not valid UTF-8", self.non_utf8_names)]:
            lines += [f"{title}: {len(items) or 'none'}", *(f"  {t}" for t in items[:max_items])]
            lines += [f"  ... and {len(items) - max_items} more"] * (len(items) > max_items)
        found = self.findings()
        return "\n".join([*lines, f"verdict: {'; '.join(found)} (exit 1)" if found
                          else "verdict: nothing that changes results (exit 0)"])


def _sizes(sizes: list[tuple[int, int]]) -> dict:
    if not sizes:
        return {"summary": "-"}
    (w_lo, h_lo), (w_med, h_med), (w_hi, h_hi) = arr = np.percentile(np.array(sizes), [0, 50, 100], axis=0)
    common = Counter(sizes).most_common(3)
    summary = (f"{len(set(sizes))} distinct, most common {', '.join(f'{w}×{h} ({n})' for (w, h), n in common)}; "
               f"width {w_lo:.0f}-{w_hi:.0f} (median {int(w_med)}), height {h_lo:.0f}-{h_hi:.0f} (median {int(h_med)})")
    return {"summary": summary, "distinct": len(set(sizes)), "most_common": [[list(s), n] for s, n in common],
            "min": arr[0].astype(int).tolist(), "median": arr[1].tolist(), "max": arr[2].astype(int).tolist()}


def _tree_findings(ds: ImageFolder) -> tuple[list[str], list[str]]:
    """(files outside the expected depth, names that are not valid UTF-8) under the dataset's root."""
    base = ds.root / (ds.split or "")
    outside, bad_names = [], []
    for dirpath, dirnames, filenames in os.walk(ds.root):  # folder links are not followed
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        bad_names += [display_path(os.path.join(dirpath, n), ds.root) for n in dirnames + filenames
                      if any("\udc80" <= c <= "\udcff" for c in n)]  # undecodable bytes, kept as lone surrogates
        if ds.labelled and Path(dirpath).is_relative_to(base) and len(Path(dirpath).relative_to(base).parts) != 1:
            outside += [display_path(os.path.join(dirpath, n), ds.root) for n in filenames
                        if not n.startswith(".") and is_image_name(n)]
    return sorted(outside), sorted(bad_names)


def audit(folder_or_dataset, near_threshold: int | None = NEAR_THRESHOLD, *, split: str | None = None,
          labelled: bool | None = None, classes: Sequence[str] | None = None, max_pixels: int | None = None,
          progress: bool = False) -> AuditReport:
    """Audit a registered dataset or an image folder (module docstring: what is checked and why).

    Parameters
    ----------
    folder_or_dataset : str, Path or ImageFolder
        What to audit. Empty class folders and aliased class folders are reported, not refused.
    near_threshold : int or None
        Largest pHash distance (bits of 64) reported as a near-duplicate; ``None`` skips the perceptual hashes.
    split, labelled, classes, max_pixels :
        As for :func:`~kplib.io.datasets.load_folder` and :func:`~kplib.io.images.decode_image`.
    """
    if near_threshold is not None:
        if not (bits := Interval(int, 0, 63)).accepts(near_threshold):  # bits of the 64-bit pHash
            raise KPLInputError(f"near_threshold must be {bits.describe()} or None, got {near_threshold!r} "
                                f"{fix(cli='--near-threshold 2', python='near_threshold=2')}")
        try:
            import imagehash
        except ImportError:
            raise KPLInputError("near-duplicate search needs imagehash: pip install imagehash, or leave it out "
                                f"{fix(cli='--no-near', python='near_threshold=None')}") from None
    ds = folder_or_dataset if isinstance(folder_or_dataset, ImageFolder) else load_dataset(
        folder_or_dataset, split=split, labelled=labelled, classes=classes, skip_empty=True, allow_aliases=True)
    labels = ds.labels.tolist() if ds.labelled else [None] * len(ds)
    rel = [display_path(p, ds.root) for p in ds.paths]
    cls = [None if y is None else ds.class_names[y] for y in labels]
    modes, sizes, unreadable, by_sha, hashes = Counter(), [], [], defaultdict(list), {}
    for i, p in enumerate(tqdm(ds.paths, desc="auditing", unit="img", disable=not progress)):
        try:
            data = read_bytes(p)
            rgb = decode_image(data, p, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            unreadable.append((rel[i], exc.reason))
            continue
        modes[rgb.info["source_format"]] += 1
        sizes.append(rgb.size)
        by_sha[hashlib.sha256(data).hexdigest()].append(i)
        if near_threshold is not None:
            hashes[i] = int(str(imagehash.phash(rgb, hash_size=8)), 16)
    exact = [{"sha256": sha, "paths": [rel[i] for i in idx], "classes": [cls[i] for i in idx],
              "cross_class": len({labels[i] for i in idx}) > 1} for sha, idx in by_sha.items() if len(idx) > 1]
    same_bytes = {i: sha for sha, idx in by_sha.items() for i in idx}
    kept, near = list(hashes), []
    h = np.array(list(hashes.values()), dtype=np.uint64)
    for start in range(0, len(h), 1024):  # pairwise Hamming distances, 1024 rows at a time
        block = np.bitwise_count(h[start:start + 1024, None] ^ h[None, :])
        for a, b in zip(*np.nonzero(block <= near_threshold)):
            i, j = kept[start + a], kept[b]
            if start + a < b and same_bytes[i] != same_bytes[j]:
                near.append({"a": rel[i], "b": rel[j], "distance": int(block[a, b]), "classes": [cls[i], cls[j]],
                             "cross_class": labels[i] != labels[j]})
    counts = ds.counts()
    ratio = max(counts.values()) / min(counts.values()) if counts and min(counts.values()) > 0 else None
    outside, bad_names = _tree_findings(ds)
    return AuditReport(root=display_path(ds.root), layout="class folders" if ds.labelled else "unlabelled",
                       split=ds.split, n_images=len(ds), class_counts=counts, imbalance_ratio=ratio,
                       modes=dict(modes.most_common()), sizes=_sizes(sizes), unreadable=unreadable,
                       exact_duplicates=exact, near_threshold=near_threshold, outside_depth=outside,
                       near_duplicates=sorted(near, key=lambda d: (d["distance"], d["a"], d["b"])),
                       non_utf8_names=bad_names, empty_classes=list(ds.dropped_classes),
                       aliases=[[display_path(p, ds.root) for p in group] for group in _aliases(ds)])
