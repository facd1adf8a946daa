"""``kpl kb ...``: validate, import, generate and list knowledge bases.

:func:`register` adds the ``kb`` command group to the ``kpl`` parser. Each sub-command's ``func(args)`` returns the
exit code — 0 success, 1 the KB has validation errors — and raises :class:`~kplib.errors.KPLError` for bad input,
which ``kpl`` prints as one line (exit 2).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import KPLError, KPLInputError, fix
from ..io import datasets, descriptors, knowledge
from ..io.llm import PROMPTS, LLMConfig, generate_kb


def _split(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",")]
    if not all(names):
        raise KPLInputError(f"--classes must be a comma-separated list of class names, got {text!r}.")
    return names


def _output(text: str) -> Path:
    out = Path(text)
    if not out.parent.is_dir():
        raise KPLInputError(f"--output {text}: folder {out.parent} does not exist.")
    return out


def _coverage(args, kb: knowledge.KnowledgeBase) -> list[str] | None:
    """The class names to check coverage against: --classes, --dataset, else the KB's own registered dataset."""
    if args.classes:
        return _split(args.classes)
    name = args.dataset or (kb.dataset if kb.dataset in datasets.registry() and not args.no_dataset else None)
    if name is None:
        return None
    try:  # empty class folders are left out, so a KB class without images is reported
        return datasets.load_dataset(name, skip_empty=True).class_names
    except KPLError as e:
        if args.dataset:
            raise
        print(f"note: coverage not checked against dataset {name!r} ({e})")
        return None


def _report(args, kb: knowledge.KnowledgeBase, class_names: list[str] | None) -> knowledge.ValidationReport:
    """Validate ``kb`` with the check options of ``args`` and print the report."""
    report = knowledge.validate(kb, class_names=class_names, tokenizer=getattr(args, "checkpoint", None),
                                template=args.template or knowledge.KPL_TEMPLATE, min_count=args.min_count,
                                check_tokens=not args.no_token_check)
    print(report.to_text(max_findings=None if getattr(args, "all", False) else 50))
    return report


def cmd_validate(args) -> int:
    kb = knowledge.load_kb(args.kb)
    return 0 if _report(args, kb, _coverage(args, kb)).ok else 1


def _class_map(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        cmap = json.loads(Path(text).read_text(encoding="utf-8") if Path(text).is_file() else text)
    except json.JSONDecodeError:
        cmap = None
    if not isinstance(cmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cmap.items()):
        raise KPLInputError(f"--class-map must be a JSON object {{\"file class\": \"dataset class\"}} or a file "
                            f"holding one; got {text!r}.")
    return cmap


def cmd_import(args) -> int:
    out = _output(args.output)
    names = _split(args.classes) if args.classes else None
    kb = descriptors.import_descriptors(args.file, class_map=_class_map(args.class_map), dataset=args.dataset,
                                      class_names=names, subset=args.subset,
                                      drop_empty_classes=args.drop_empty_classes)
    n = sum(len(c.descriptions) for c in kb.classes)
    print(f"{args.file}: {len(kb.classes)} classes, {n} descriptions ({kb.source['kind']}, {kb.source['format']})")
    report = _report(args, kb, names or (kb.class_names if args.dataset else None))
    if not report.ok and not args.force:
        print(f"not written: {len(report.errors)} error(s). Fix them in {args.file}, or write the KB anyway "
              + fix(cli="--force", python="save_kb(import_descriptors(...), ...)"))
        return 1
    knowledge.save_kb(kb, out)
    print(f"wrote {out}: {len(kb.classes)} classes, {n} descriptions")
    return 0


def cmd_generate(args) -> int:
    out = _output(args.output)
    display, modality = None, args.modality
    if args.classes:
        names = _split(args.classes)
    elif args.dataset:
        ds = datasets.load_dataset(args.dataset)
        names, display = ds.class_names, ds.display_names
        modality = modality or getattr(datasets.registry().get(args.dataset), "modality", None)
    else:
        raise KPLInputError("kb generate needs the classes: pass --classes a,b,... or --dataset NAME_OR_FOLDER.")
    options = {k: v for k, v in (("temperature", args.temperature), ("timeout", args.timeout),
                                 ("max_retries", args.max_retries)) if v is not None}
    cfg = LLMConfig.from_env(base_url=args.base_url, model=args.llm_model, **options)
    kb = generate_kb(names, dataset=args.dataset, modality=modality, prompt=args.prompt, display_names=display,
                     config=cfg)
    knowledge.save_kb(kb, out)  # written even with findings: the reply was paid for; the report says what to fix
    print(f"wrote {out}: {len(kb.classes)} classes, {sum(len(c.descriptions) for c in kb.classes)} descriptions "
          f"from {cfg.model} at {cfg.host}")
    return 0 if _report(args, kb, names).ok else 1


def cmd_list(args) -> int:
    names = knowledge.list_curated()
    print(f"curated knowledge bases ({len(names)}):")
    for name in names:
        kb = knowledge.load_kb(name)
        counts = [len(c.descriptions) for c in kb.classes]
        print(f"  {name:<24} {kb.kb_id:<36} {len(counts)} classes, {sum(counts)} descriptions "
              f"({min(counts)}-{max(counts)} per class), modality: {kb.modality}")
    if args.published:
        print("published descriptor files (imported as they are):")
        for name, kb in descriptors.import_all_published():
            print(f"  {name}: REJECTED — {kb}" if isinstance(kb, str) else
                  f"  {name}: {len(kb.classes)} classes, {sum(len(c.texts) for c in kb.classes)} {kb.source['kind']}")
    return 0


def _checks(p: argparse.ArgumentParser, model_help: str | None) -> None:
    p.add_argument("--min-count", type=int, default=None,
                   help="fewest descriptions per class (default: 40 for curated KBs, else 1)")
    p.add_argument("--template", default=None, help="prompt template with {class_name} and {description} "
                                                    "(default: the released KPL template)")
    if model_help:
        p.add_argument("--model", dest="checkpoint", default=None, metavar="CHECKPOINT", help=model_help)
    p.add_argument("--no-token-check", action="store_true", help="skip the prompt token-length check")


def _coverage_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dataset", metavar="NAME_OR_FOLDER", help=f"registered dataset or image folder {what}")
    g.add_argument("--classes", help=f"comma-separated class names {what}")


def register(subparsers) -> None:
    """Add the ``kb`` command group (validate, import, generate, list) to the ``kpl`` sub-parsers."""
    kb = subparsers.add_parser("kb", help="knowledge bases: validate, import, generate, list",
                               description="Knowledge bases (KPL stage 0): per-class visual descriptions.")
    sub = kb.add_subparsers(dest="kb_command", required=True)
    tokenizer = ("count prompt tokens with this checkpoint's tokenizer (hub id or folder, local files only; default: "
                 "the CLIP tokenizer in KPL_TOKENIZER_DIR; without one the check is skipped with a warning)")

    p = sub.add_parser("validate", help="check a KB; exit 1 when it has errors",
                       description="Check a KB file or curated KB: coverage of the dataset's classes, counts, "
                                   "duplicates, descriptions naming another class, prompt token lengths.")
    p.add_argument("kb", help="a KB file or a curated KB name (see `kpl kb list`)")
    _coverage_options(p, "to check coverage against")
    p.add_argument("--no-dataset", action="store_true", help="do not check against the dataset named in the KB")
    p.add_argument("--all", action="store_true", help="print every finding (default: the first 50)")
    _checks(p, tokenizer)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("import", help="convert a descriptor file into a KB file",
                       description="Convert {class: [descriptions]} (or another descriptor file, see "
                                   "import_descriptors) into a schema-v1 KB. Nothing is written when the KB has "
                                   "validation errors, unless --force.")
    p.add_argument("file", help="the descriptor JSON file")
    p.add_argument("-o", "--output", required=True, help="KB file to write")
    _coverage_options(p, "the file must cover")
    p.add_argument("--class-map", help='JSON {"file class": "dataset class"} (or a file holding it)')
    p.add_argument("--subset", help="descriptor set inside a multi-set file (e.g. disease_descriptors_NLM)")
    p.add_argument("--drop-empty-classes", action="store_true",
                   help="leave out classes without descriptions (recorded in the KB) instead of failing")
    p.add_argument("--force", action="store_true", help="write the KB even when validation finds errors")
    _checks(p, tokenizer)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("generate", help="generate a KB with an OpenAI-compatible LLM endpoint",
                       description="One request per class with the released KPL prompt (or the medical variant). "
                                   "Endpoint: KPL_LLM_BASE_URL, KPL_LLM_MODEL, KPL_LLM_API_KEY.")
    p.add_argument("--classes", help="comma-separated class names (default: the dataset's class folders)")
    p.add_argument("--dataset", metavar="NAME_OR_FOLDER",
                   help="registered dataset or image folder (classes, display names, modality), or with --classes "
                        "a label recorded in the KB")
    p.add_argument("--prompt", default="released", choices=sorted(PROMPTS),
                   help="released: the paper's per-class list prompt; medical: modality-aware variant")
    p.add_argument("--modality", help="imaging modality for --prompt medical, e.g. 'fundus photograph'")
    p.add_argument("--base-url", help="endpoint, e.g. https://api.openai.com/v1 (default: KPL_LLM_BASE_URL)")
    p.add_argument("--model", dest="llm_model", help="LLM name, e.g. gpt-3.5-turbo (default: KPL_LLM_MODEL)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds per request (default 120)")
    p.add_argument("--max-retries", type=int, default=None, help="retries on 429/5xx/timeouts (default 4)")
    p.add_argument("-o", "--output", required=True, help="KB file to write")
    _checks(p, None)  # --model names the LLM here; `kpl kb validate OUT --model CHECKPOINT` counts its tokens
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("list", help="list the curated KBs (and, with --published, the descriptor files)")
    p.add_argument("--published", action="store_true", help="also try importing every published descriptor file")
    p.set_defaults(func=cmd_list)
