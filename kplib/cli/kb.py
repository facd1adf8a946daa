"""``kpl kb ...``: validate, import, generate and list knowledge bases from the command line.

``kplib.cli`` calls :func:`add_kb_subparsers`; ``python -m kplib.cli_kb kb <command> ...`` runs the same commands
standalone. Each sub-command sets ``func`` (returns the exit code): 0 success, 1 validation errors, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ..errors import KPLError, KPLInputError


def _split_classes(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",")]
    if not names or any(not c for c in names):
        raise KPLInputError(f"--classes must be a comma-separated list of class names, got {text!r}.")
    return names


def _dataset_info(name: str) -> tuple[list[str], list[str] | None, str | None]:
    """(class_names, display_names, modality) of a registered dataset (kplib.data)."""
    from ..knowledge import _resolve_dataset_classes
    return _resolve_dataset_classes(name)


def _class_list(args) -> list[str] | None:
    if getattr(args, "classes", None):
        return _split_classes(args.classes)
    if getattr(args, "dataset", None):
        return _dataset_info(args.dataset)[0]
    return None


def _cmd_validate(args) -> int:
    from ..knowledge import load_kb, validate
    kb = load_kb(args.kb)
    class_names = _class_list(args)
    if class_names is None and kb.dataset and not args.no_dataset:
        try:
            class_names = _dataset_info(kb.dataset)[0]
        except KPLError as e:
            print(f"note: not checking coverage against dataset {kb.dataset!r} ({e})", file=sys.stderr)
    report = validate(kb, class_names=class_names, min_count=args.min_count,
                      check_tokens=not args.no_token_check)
    print(report.to_text(max_findings=None if args.all else 50))
    return 0 if report.ok else 1


def _load_class_map(text: str | None) -> dict | None:
    if not text:
        return None
    p = Path(text)
    raw = p.read_text(encoding="utf-8") if p.is_file() else text
    try:
        cmap = json.loads(raw)
    except json.JSONDecodeError as e:
        raise KPLInputError(f"--class-map must be a JSON object {{\"file class\": \"dataset class\"}} or a file "
                            f"holding one: {e.msg} at column {e.colno}.") from None
    if not isinstance(cmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cmap.items()):
        raise KPLInputError("--class-map must map file class names (strings) to dataset class names (strings).")
    return cmap


def _cmd_import(args) -> int:
    from ..knowledge import import_descriptor_file, save_kb, validate
    class_names = _split_classes(args.classes) if args.classes else None
    kb = import_descriptor_file(args.file, class_map=_load_class_map(args.class_map), dataset=args.dataset,
                                class_names=class_names, subset=args.subset,
                                drop_empty_classes=args.drop_empty_classes)
    save_kb(kb, args.output)
    n = sum(len(c.descriptions) for c in kb.classes)
    print(f"wrote {args.output}: {len(kb.classes)} classes, {n} descriptions ({kb.source['kind']}) from "
          f"{kb.source['file']}")
    report = validate(kb, class_names=class_names or (kb.class_names if args.dataset else None),
                      min_count=args.min_count, check_tokens=not args.no_token_check)
    print(report.to_text())
    return 0 if report.ok else 1


def _cmd_generate(args) -> int:
    from ..knowledge import save_kb, validate
    from ..llm import LLMConfig, generate_kb
    display = None
    modality = args.modality
    if args.classes:
        class_names = _split_classes(args.classes)
    elif args.dataset:
        class_names, display, ds_modality = _dataset_info(args.dataset)
        modality = modality or ds_modality
    else:
        raise KPLInputError("kb generate: pass --classes a,b,... or --dataset NAME.")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise KPLInputError(f"-o/--output: folder {out.parent} does not exist.")
    cfg_kw = {k: v for k, v in (("temperature", args.temperature), ("timeout", args.timeout),
                                ("max_retries", args.max_retries)) if v is not None}
    cfg = LLMConfig.from_env(base_url=args.base_url, model=args.model, **cfg_kw)
    kb = generate_kb(class_names, dataset=args.dataset, modality=modality, prompt=args.prompt,
                     display_names=display, config=cfg)
    save_kb(kb, out)
    print(f"wrote {out}: {len(kb.classes)} classes, {sum(len(c.descriptions) for c in kb.classes)} descriptions "
          f"from {cfg.model} at {cfg.host}")
    report = validate(kb, class_names=class_names, min_count=args.min_count, check_tokens=not args.no_token_check)
    print(report.to_text())
    return 0 if report.ok else 1


def _cmd_list(args) -> int:
    from ..knowledge import import_all_published, list_curated, load_kb
    names = list_curated()
    print(f"curated knowledge bases ({len(names)}):")
    for n in names:
        kb = load_kb(n)
        counts = [len(c.descriptions) for c in kb.classes]
        print(f"  {n:<24} {kb.kb_id:<36} {len(counts)} classes, {sum(counts)} descriptions "
              f"({min(counts)}-{max(counts)} per class), modality: {kb.modality}")
    if args.published:
        print("published descriptor files (imported as-is):")
        for name, r in import_all_published():
            if isinstance(r, str):
                print(f"  {name}: REJECTED — {r}")
            else:
                n = sum(len(c.descriptions) for c in r.classes)
                print(f"  {name}: {len(r.classes)} classes, {n} {r.source['kind']}")
    return 0


def add_kb_subparsers(subparsers) -> argparse.ArgumentParser:
    """Add ``kb`` (with validate / import / generate / list) to a top-level ``subparsers`` object."""
    kb = subparsers.add_parser("kb", help="knowledge bases: validate, import, generate, list",
                               description="Knowledge bases (KPL stage 0).")
    sub = kb.add_subparsers(dest="kb_command", metavar="{validate,import,generate,list}")
    sub.required = True

    def common_checks(p):
        p.add_argument("--min-count", type=int, default=None,
                       help="fewest descriptions per class (default: 40 for curated KBs, else 1)")
        p.add_argument("--no-token-check", action="store_true",
                       help="skip the CLIP token-length check (needs the tokenizer in KPL_TOKENIZER_DIR)")

    p = sub.add_parser("validate", help="check a KB; exit 1 when it has errors")
    p.add_argument("kb", help="a KB file or a curated KB name (see `kpl kb list`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dataset", help="check coverage against this registered dataset's class folders")
    g.add_argument("--classes", help="comma-separated class names to check coverage against")
    p.add_argument("--no-dataset", action="store_true",
                   help="do not check against the dataset named inside the KB")
    p.add_argument("--all", action="store_true", help="print every finding (default: the first 50)")
    common_checks(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("import", help="import a published descriptor file into a KB file")
    p.add_argument("file", help="descriptor JSON file (e.g. under $KPL_DESCRIPTORS_ROOT)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dataset", help="registered dataset whose classes the file must cover")
    g.add_argument("--classes", help="comma-separated class names the file must cover")
    p.add_argument("--class-map", help='JSON {"file class": "dataset class"} (or a file holding it)')
    p.add_argument("--subset", help="descriptor set inside a multi-set file (e.g. disease_descriptors_NLM)")
    p.add_argument("--drop-empty-classes", action="store_true",
                   help="leave out classes without descriptions (recorded in the KB) instead of failing")
    p.add_argument("-o", "--output", required=True, help="KB file to write")
    common_checks(p)
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("generate", help="generate a KB with an OpenAI-compatible LLM endpoint "
                                        "(KPL_LLM_BASE_URL, KPL_LLM_MODEL, KPL_LLM_API_KEY)")
    p.add_argument("--classes", help="comma-separated class names (default: the dataset's class folders)")
    p.add_argument("--dataset", help="registered dataset (class list, display names, modality), or a label")
    p.add_argument("--prompt", default="released", choices=["released", "medical"],
                   help="released: the paper's per-class list prompt; medical: modality-aware variant")
    p.add_argument("--modality", help="imaging modality for --prompt medical, e.g. 'fundus photograph'")
    p.add_argument("--base-url", help="overrides KPL_LLM_BASE_URL")
    p.add_argument("--model", help="overrides KPL_LLM_MODEL")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds per request (default 120)")
    p.add_argument("--max-retries", type=int, default=None, help="retries on 429/5xx/timeouts (default 4)")
    p.add_argument("-o", "--output", required=True, help="KB file to write")
    common_checks(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("list", help="list the curated KBs (and, with --published, the descriptor files)")
    p.add_argument("--published", action="store_true", help="also try importing every published descriptor file")
    p.set_defaults(func=_cmd_list)
    return kb


def run(args) -> int:
    """Run a parsed ``kb`` command, turning kplib errors into a message on stderr and exit code 2."""
    try:
        return args.func(args)
    except KPLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kpl", description="kplib knowledge-base commands")
    sub = parser.add_subparsers(dest="command", metavar="kb")
    sub.required = True
    add_kb_subparsers(sub)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
