"""``kpl datasets`` and ``kpl audit``: what data there is, and whether it can be trusted.

Examples::

    kpl datasets                          # the registered datasets and whether their folders exist
    kpl datasets ./my_export              # classes, counts and layout of any folder
    kpl audit brain_tumor_mri --json      # duplicates, leaks, unreadable files ... (exit 1 when one matters)

:func:`add_dataset_args` and :func:`dataset_options` give every command that reads a folder the same options.
"""
from __future__ import annotations

import argparse
import json

from ..errors import KPLInputError
from ..io.audit import NEAR_THRESHOLD, audit
from ..io.datasets import load_dataset, registry
from ..paths import data_root


def _class_list(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if len(names) < 2:
        raise argparse.ArgumentTypeError(f"give at least 2 comma-separated class names, got {text!r}")
    return names


def add_dataset_args(p: argparse.ArgumentParser, guards: bool = True) -> None:
    """The options that say how to read an image folder (see :func:`kplib.io.datasets.load_folder`)."""
    p.add_argument("--split", default=None, metavar="NAME",
                   help="sub-folder holding the class folders, e.g. val (default: the folder, or its only split)")
    p.add_argument("--unlabelled", action="store_true",
                   help="no class folders: read every image under the folder (any depth); the classes come from "
                        "--classes or the knowledge base")
    p.add_argument("--classes", type=_class_list, default=None, metavar="A,B,...",
                   help="class names of unlabelled images (implies --unlabelled)")
    if guards:
        p.add_argument("--skip-empty-classes", action="store_true",
                       help="drop class folders without images (with a warning) instead of stopping")
        p.add_argument("--allow-aliases", action="store_true",
                       help="accept class folders that are the same folder (symbolic links), with a warning")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="decompression-bomb limit: refuse to decode images of more than N pixels (default Pillow's "
                        "178,956,970); raise it for trusted very large images. Images whose embeddings are "
                        "already in the store are not decoded again, so the limit does not apply to them")


def dataset_options(args: argparse.Namespace) -> dict:
    """:func:`kplib.io.datasets.load_dataset` keyword arguments from the options of :func:`add_dataset_args`."""
    options = {"split": args.split, "classes": args.classes,
               "labelled": False if (args.unlabelled or args.classes) else None}
    if hasattr(args, "skip_empty_classes"):
        options.update(skip_empty=args.skip_empty_classes, allow_aliases=args.allow_aliases)
    return options


def _list_registry() -> int:
    try:
        root = data_root()
    except KPLInputError as exc:
        root = None
        print(f"note: {exc}")
    print(f"data root: {root}")
    rows = [("name", "present", "classes", "kb", "modality", "relation to the KPL paper")]
    for name, info in registry().items():
        folder = root / info.folder / info.split if root is not None else None
        n = (sum(c.is_dir() and not c.name.startswith(".") for c in folder.iterdir())
             if folder is not None and folder.is_dir() else None)
        kb = info.kb or (f"DCLIP, imported at run time ({info.published_descriptors})"
                         if info.published_descriptors and info.display_names_file else "–")
        rows.append((name, "no" if n is None else "yes", "–" if n is None else str(n), kb, info.modality,
                     info.paper_dataset))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    """List the registry, or describe one folder or dataset: layout, classes, counts, display names."""
    if args.folder is None:
        return _list_registry()
    d = load_dataset(args.folder, **dataset_options(args)).describe()
    print(f"dataset: {d['name']}\nfolder: {d['root']}" + (f" (split {d['split']})" if d["split"] else ""))
    print(f"layout: {d['layout']}; {d['n_images']} images, {d['n_classes']} classes")
    width = max((len(c) for c in d["class_names"]), default=0)
    for c, shown in zip(d["class_names"], d["display_names"]):
        n = f"{d['counts'][c]:>7}" if d["counts"] else ""
        print(f"  {c.ljust(width)}{n}" + (f"  (prompt name: {shown})" if shown != c else ""))
    if d["dropped_classes"]:
        print(f"dropped empty class folders: {', '.join(d['dropped_classes'])}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit a folder or dataset; exit 1 when a finding changes results (unreadable, leaks, aliases, empty)."""
    report = audit(args.folder, near_threshold=None if args.no_near else args.near_threshold,
                   max_pixels=args.max_pixels, progress=args.progress, **dataset_options(args))
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json
          else report.to_text(max_items=args.max_items))
    return report.exit_code


def register(subparsers) -> None:
    """Add the ``datasets`` and ``audit`` sub-commands to ``kpl``'s sub-parsers."""
    p = subparsers.add_parser("datasets", help="list the registered datasets, or describe a folder",
                              description="Without an argument: the registered datasets (kplib/io/datasets.json) "
                                          "under $KPL_DATA_ROOT. With one: the layout, classes and image counts of "
                                          "that dataset or folder.")
    p.add_argument("folder", nargs="?", default=None, metavar="FOLDER_OR_DATASET")
    add_dataset_args(p)
    p.set_defaults(func=cmd_datasets)

    p = subparsers.add_parser(
        "audit", help="check a folder: duplicates across classes, aliases, unreadable files, near-duplicates",
        description="Audit an image folder or registered dataset: class counts and imbalance, formats and sizes, "
                    "unreadable files, exact duplicates (same bytes) within and across classes, near-duplicates "
                    "(perceptual hash), aliased or empty class folders, files outside <class>/<image>, names that "
                    "are not UTF-8. Exit code 0: nothing that changes results; 1: unreadable files, duplicates "
                    "across classes, aliased or empty class folders; 2: usage error.")
    p.add_argument("folder", metavar="FOLDER_OR_DATASET")
    add_dataset_args(p, guards=False)
    p.add_argument("--near-threshold", type=int, default=NEAR_THRESHOLD, metavar="BITS",
                   help=f"largest perceptual-hash distance (of 64 bits) reported as a near-duplicate "
                        f"(default {NEAR_THRESHOLD})")
    p.add_argument("--no-near", action="store_true", help="skip the near-duplicate search")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-items", type=int, default=20, metavar="N", help="items listed per finding (text report)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False, help="progress bar on stderr")
    p.set_defaults(func=cmd_audit)
