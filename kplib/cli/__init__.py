"""``kpl``: the command line of kplib — list datasets, encode an image folder, run a method, manage KBs.

Examples::

    kpl datasets
    kpl encode malaria_cells --model openai/clip-vit-base-patch16
    kpl run malaria_cells --method kpl --mode corrected --k 8 --predictions preds.csv
    kpl run ./my_folder --method zero_shot --kb ./my_kb.json --model ./my_clip_checkpoint
    kpl kb validate malaria_cells

Errors caused by input (``kplib.errors.KPLError``) print one line on stderr and exit with code 2. Output files are
deterministic: the same command twice writes byte-identical files (run metadata without dates or timings goes to a
``<name>.meta.json`` sidecar).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from ..errors import KPLError, KPLInputError, StandInWarning

log = logging.getLogger("kplib")

RUN_METHODS = ("zero_shot", "descriptor_mean", "inmap", "kpl", "kpl_reference", "kpl_corrected")
_SCORE_DIGITS = 6
#: KPLConfig fields that get their own CLI option elsewhere (``--mode``, ``--seed``) or none.
_CONFIG_SKIP = {"mode", "seed"}
_CONFIG_HELP = {
    "k": "top-K descriptions kept per class (TPO)",
    "retrieval": "'dataset' (released: one selection for all images) or 'per_image' (extension)",
    "tau_t": "temperature of the text pseudo-labels P0 = softmax(L / tau_t)",
    "tau_i": "temperature of the image-proxy softmax in proxy learning",
    "alpha": "confidence hardening threshold",
    "class_marginal": "'uniform', 'gamma' or 'em' class marginal for transport",
    "gamma": "exponent of the gamma class marginal q_c ∝ (Σ_i P0_ic)^gamma",
    "lr": "initial proxy-learning step size",
    "iters_proxy": "proxy-learning iterations",
    "iters_ot": "transport iterations (reference routines)",
    "transport": "transport routine (default: the mode's own)",
    "ot_tol": "transport tolerance (corrected mode)",
    "proxy_tol": "proxy-learning tolerance (corrected mode)",
    "no_transport_baseline": "also learn proxies from P0 without transport",
    "record_every": "keep a proxy snapshot every N steps",
    "ot_max_iter": "sweep budget of the corrected transport solvers",
    "normalize_rows": "rescale transported rows to sum to 1 before hardening (default: the mode's)",
}
_CONFIG_CHOICES = {
    "retrieval": ("dataset", "per_image"),
    "class_marginal": ("uniform", "gamma", "em"),
}

STANDIN_BANNER = (
    "!" * 100 + "\n"
    "!!  UNTRAINED STAND-IN ENCODER (random CLIP, seed 0): THESE NUMBERS ARE MEANINGLESS.\n"
    "!!  It is a randomly initialised CLIP (chosen with --model standin, or the fallback of --model auto when no\n"
    "!!  pretrained CLIP could be loaded). Pass --model <hub id or folder> (or set KPL_MODEL) for real results.\n"
    + "!" * 100
)


# ------------------------------------------------------------------------------------------------ parser
def _kplconfig_fields() -> list[dataclasses.Field]:
    from ..methods import KPLConfig

    return [f for f in dataclasses.fields(KPLConfig) if f.name not in _CONFIG_SKIP]


def _field_kind(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" ", "")
    for kind in ("bool", "int", "float", "str"):
        if t in (kind, f"{kind}|None", f"None|{kind}", f"Optional[{kind}]"):
            return kind
    return "str"


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="FOLDER_OR_DATASET",
                   help="a registered dataset (see `kpl datasets`) or an image folder laid out as "
                        "<folder>/<class>/<image> or <folder>/<split>/<class>/<image>")
    p.add_argument("--model", default="auto",
                   help="CLIP checkpoint: Hugging Face hub id or local folder; 'standin' for the untrained stand-in; "
                        "'auto' (default) = $KPL_MODEL or openai/clip-vit-large-patch14-336, falling back to the "
                        "stand-in with a loud warning when it cannot be loaded")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: $KPL_DEVICE, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute precision (bfloat16: faster where the CPU has bfloat16 instructions, and on GPUs; "
                        "embeddings are always float32)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--limit-per-class", type=int, default=None, metavar="N",
                   help="use a seeded random subset of at most N images per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset, the method and the bootstrap (default 0)")
    p.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                   help="undecodable images: stop with an error naming the file (default) or skip and report them")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice). On a machine shared with other jobs, 1 can be "
                        "much faster for the small matrix operations of the methods")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kpl", description="KPL (AAAI 2025) and baselines on image folders with any Hugging Face CLIP.",
        epilog="Environment: KPL_MODEL, KPL_DATA_ROOT, KPL_CACHE_DIR, KPL_TOKENIZER_DIR (see ARCHITECTURE.md).")
    parser.add_argument("--version", action="version", version=f"kplib {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="{datasets,encode,run,kb}")
    sub.required = True

    p = sub.add_parser("datasets", help="list the registered datasets and whether their folders exist",
                       description="List the registered datasets (kplib.data.DATASETS) under $KPL_DATA_ROOT.")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("encode", help="encode a dataset's images into the embedding cache",
                       description="Encode every image of a dataset or folder with a CLIP image encoder and store "
                                   "the embeddings in the cache ($KPL_CACHE_DIR); prints counts and the encoder.")
    _add_encoder_args(p)
    p.add_argument("--save", metavar="FILE.pt", help="also write the embeddings (with provenance) to this file")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("run", help="run a method and print accuracy, balanced accuracy and macro-F1",
                       description="Run zero-shot CLIP, descriptor averaging, InMaP or KPL on a dataset or folder "
                                   "and print the metrics table (labels come from the class folders).")
    _add_encoder_args(p)
    p.add_argument("--method", default="kpl", choices=RUN_METHODS, help="method to run (default kpl)")
    p.add_argument("--mode", default="reference", choices=["reference", "corrected"],
                   help="KPL/InMaP mode: 'reference' reproduces the released code, 'corrected' the intended method")
    p.add_argument("--kb", default=None, metavar="NAME_OR_PATH",
                   help="knowledge base: curated name (see `kpl kb list`) or JSON file; default: the dataset's "
                        "curated KB")
    p.add_argument("--template", default=None, help="description prompt template with {class_name} and "
                                                   "{description} (default: the released KPL template)")
    p.add_argument("--strict-prompts", action="store_true",
                   help="fail (instead of warn and truncate) when a prompt exceeds the text context")
    p.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--predictions", metavar="OUT.csv|OUT.json",
                   help="write per-image predictions (path, true class, predicted class, per-class scores); run "
                        "metadata goes to OUT.meta.json")
    cfg = p.add_argument_group("KPL configuration (KPLConfig; default: the mode's values)")
    for f in _kplconfig_fields():
        flag = "--" + f.name.replace("_", "-")
        kind = _field_kind(f)
        helptext = _CONFIG_HELP.get(f.name, f.name)
        if kind == "bool" and f.default is False:
            cfg.add_argument(flag, dest=f"cfg_{f.name}", action="store_const", const=True, default=None,
                             help=helptext)
        elif kind == "bool":
            cfg.add_argument(flag, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction, default=None,
                             help=helptext)
        else:
            choices = _CONFIG_CHOICES.get(f.name)
            if f.name == "transport":
                from ..methods import TRANSPORTS as choices
            cfg.add_argument(flag, dest=f"cfg_{f.name}", type={"int": int, "float": float, "str": str}[kind],
                             default=None, choices=choices, metavar=None if choices else kind.upper(),
                             help=helptext if f.default is None else f"{helptext} (default {f.default!r})")
    p.set_defaults(func=cmd_run)

    try:
        from .kb import add_kb_subparsers
    except ImportError:  # pragma: no cover - the KB commands ship with kplib
        pass
    else:
        add_kb_subparsers(sub)
    return parser


# ------------------------------------------------------------------------------------------------ commands
def _kb_label(name: str, info) -> str:
    """The knowledge base `kpl run` uses by default (kplib.experiment.default_kb_for), in words."""
    if info.kb is not None:
        return info.kb
    if info.published_descriptors is not None and name == "imagenet_sample":
        return f"DCLIP, imported at run time ({info.published_descriptors})"
    return "–"


def cmd_datasets(args) -> int:
    from .. import config
    from ..data import DATASETS

    try:
        root = config.data_root()
    except KPLInputError as exc:
        root = None
        print(f"note: {exc}")
    print(f"data root: {root}")
    rows = []
    for name, info in DATASETS.items():
        folder = root / info.folder / info.split if root is not None else None
        n_classes = "–"
        if folder is not None and folder.is_dir():
            n_classes = str(sum(1 for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")))
        rows.append((name, "yes" if folder is not None and folder.is_dir() else "no", n_classes,
                     _kb_label(name, info), info.modality, info.paper_dataset))
    header = ("name", "present", "classes", "kb", "modality", "relation to the KPL paper")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header) - 1)]
    for r in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _progress(args) -> bool:
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def _describe_encoder(identity) -> str:
    rev = f" (revision {identity.revision})" if identity.revision else ""
    return f"encoder: {identity.label}{rev}"


def _check_batch(args) -> None:
    """Validate the shared numeric options and apply --threads."""
    if args.threads is not None:
        if args.threads < 1:
            raise KPLInputError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise KPLInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit_per_class is not None and args.limit_per_class < 1:
        raise KPLInputError(f"--limit-per-class must be >= 1, got {args.limit_per_class}")


def cmd_encode(args) -> int:
    from ..encoders import load_encoder
    from ..experiment import embed_dataset, resolve_dataset

    _check_batch(args)
    dataset = resolve_dataset(args.dataset, limit_per_class=args.limit_per_class, seed=args.seed)  # fail fast
    encoder = load_encoder(args.model, device=args.device, dtype=args.dtype)
    if encoder.identity.is_standin:
        print(STANDIN_BANNER)
    emb = embed_dataset(dataset, encoder, cache=not args.no_cache, on_error=args.on_error,
                        batch_size=args.batch_size, progress=_progress(args))
    print(_describe_encoder(emb.encoder))
    print(f"dataset: {emb.dataset} ({emb.meta['dataset'].get('root')}): {len(emb)} images, "
          f"{len(emb.class_names)} classes, dim {emb.embeddings.shape[1]}")
    for c, n in emb.counts().items():
        print(f"  {c}: {n}")
    if emb.skipped:
        print(f"skipped {len(emb.skipped)} undecodable image(s):")
        for path, reason in emb.skipped:
            print(f"  {path}: {reason}")
    if emb.cache_stats is None:
        print("cache: off")
    else:
        s = emb.cache_stats
        print(f"cache: {s['hits']} hit(s), {s['misses']} miss(es), {s['writes']} written")
    if args.save:
        out = emb.save(args.save)
        print(f"saved {out}")
    return 0


def _config_overrides(args) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def cmd_run(args) -> int:
    from ..encoders import load_encoder
    from ..experiment import KPL_TEMPLATE, embed_dataset, embed_knowledge, provenance, resolve_dataset, resolve_kb
    from ..methods import KPLConfig, run_method
    from ..metrics import evaluate, results_table

    if args.n_bootstrap < 0:
        raise KPLInputError(f"--n-bootstrap must be >= 0, got {args.n_bootstrap}")
    pred_path = _check_predictions_path(args.predictions)
    overrides = _config_overrides(args)
    if args.method in ("zero_shot", "descriptor_mean"):
        if overrides:
            flags = ", ".join("--" + k.replace("_", "-") for k in sorted(overrides))
            raise KPLInputError(f"--method {args.method} has no KPL configuration; remove {flags}")
        config = None
    else:
        make = KPLConfig.corrected if args.mode == "corrected" else KPLConfig.reference
        config = make(seed=args.seed, **overrides)

    # validate every cheap input (dataset, KB, template) before loading the model and encoding
    _check_batch(args)
    if args.template is not None and ("{class_name}" not in args.template or "{description}" not in args.template):
        raise KPLInputError(f"--template {args.template!r} must contain {{class_name}} and {{description}}")
    dataset = resolve_dataset(args.dataset, limit_per_class=args.limit_per_class, seed=args.seed)
    kb = resolve_kb(args.kb, dataset.name).select(dataset.class_names)
    encoder = load_encoder(args.model, device=args.device, dtype=args.dtype)
    if encoder.identity.is_standin:
        print(STANDIN_BANNER)
    emb = embed_dataset(dataset, encoder, cache=not args.no_cache, on_error=args.on_error,
                        batch_size=args.batch_size, progress=_progress(args))
    text = embed_knowledge(kb, encoder, emb.class_names, template=args.template or KPL_TEMPLATE,
                           strict=args.strict_prompts, cache=not args.no_cache)
    result = run_method(args.method, emb.embeddings, text, config=config)
    meta = provenance(emb, text, kb, result, args.seed)

    metrics = evaluate(emb.labels, result.predictions, emb.class_names, n_bootstrap=args.n_bootstrap,
                       seed=args.seed)
    mode = result.config.get("mode") if isinstance(result.config, dict) else None
    method_name = f"{result.method} ({mode})" if mode else result.method
    row = {**metrics, "dataset": emb.dataset, "method": method_name, "encoder": emb.encoder.label,
           "kb": kb.kb_id}
    print(_describe_encoder(emb.encoder))
    print(f"dataset: {emb.dataset}: {len(emb)} images in {len(emb.class_names)} classes "
          f"({', '.join(f'{c} {n}' for c, n in emb.counts().items())})")
    if emb.skipped:
        print(f"skipped {len(emb.skipped)} undecodable image(s) (listed in the log and in the metadata)")
    print(f"knowledge base: {kb.kb_id} ({kb.method})")
    if emb.cache_stats is not None:
        s = emb.cache_stats
        print(f"embedding cache: {s['hits']} hit(s), {s['misses']} miss(es)")
    print()
    with _pandas_wide():
        print(results_table([row]).to_string(index=False))
    if encoder.identity.is_standin:
        print(STANDIN_BANNER)
    if pred_path is not None:
        meta_path = write_predictions(pred_path, emb, result, meta)
        print(f"predictions: {pred_path} (metadata: {meta_path})")
    return 0


class _pandas_wide:
    def __enter__(self):
        import pandas as pd

        self._ctx = pd.option_context("display.width", 250, "display.max_columns", 50, "display.max_colwidth", 80)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ------------------------------------------------------------------------------------------------ predictions
def _check_predictions_path(text: str | None) -> Path | None:
    if text is None:
        return None
    path = Path(text)
    if path.suffix.lower() not in (".csv", ".json"):
        raise KPLInputError(f"--predictions {text!r} must end in .csv or .json")
    if not path.parent.is_dir():
        raise KPLInputError(f"--predictions {text!r}: folder {path.parent} does not exist")
    return path


def _meta_path(path: Path) -> Path:
    return path.with_name(path.stem + ".meta.json")


def _rel(path: str, root: str | None) -> str:
    try:
        return Path(path).relative_to(root).as_posix() if root else Path(path).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _jsonable(x: Any) -> Any:
    import numpy as np
    import torch

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_predictions(path: Path, emb, result, meta: dict) -> Path:
    """Write per-image predictions (CSV or JSON, by suffix) and the ``<stem>.meta.json`` sidecar.

    Deterministic: scores are rounded to 6 decimals, paths are relative to the dataset folder, and nothing in
    either file depends on the date, the run time or the cache state.
    """
    root = meta.get("dataset_root")
    names = list(emb.class_names)
    labels = emb.labels.tolist()
    preds = result.predictions.tolist()
    scores = result.logits.float().tolist()
    label = emb.encoder.label
    records = []
    for p, y, yhat, s in zip(emb.paths, labels, preds, scores):
        records.append({"path": _rel(p, root), "true_class": names[y], "predicted_class": names[yhat],
                        "scores": {c: round(float(v), _SCORE_DIGITS) for c, v in zip(names, s)}})
    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "true_class", "predicted_class", *[f"score_{c}" for c in names], "encoder"])
        for r in records:
            w.writerow([r["path"], r["true_class"], r["predicted_class"],
                        *[f"{r['scores'][c]:.{_SCORE_DIGITS}f}" for c in names], label])
        text = buf.getvalue()
    else:
        text = json.dumps({"encoder": label, "is_standin": emb.encoder.is_standin, "class_names": names,
                           "score": "final logits of the method (cosine similarities for the text-based methods)",
                           "predictions": records}, indent=1, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8", newline="\n")
    meta_path = _meta_path(path)
    meta_path.write_text(json.dumps(_jsonable(meta), indent=1, ensure_ascii=False, sort_keys=True) + "\n",
                         encoding="utf-8", newline="\n")
    return meta_path


# ------------------------------------------------------------------------------------------------ entry point
def _setup_logging(verbosity: int) -> tuple:
    """Send kplib's log to stderr ("kpl: WARNING: ..."); returns the previous logger state to restore."""
    saved = (list(log.handlers), log.level, log.propagate)
    level = logging.WARNING if verbosity <= 0 else (logging.INFO if verbosity == 1 else logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kpl: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # kplib logs every warning it raises (stand-in, truncated prompts, cache off): show each once, as a log line
    from ..cache import CacheWarning
    from ..encoders import PromptTruncationWarning

    for category in (StandInWarning, PromptTruncationWarning, CacheWarning):
        warnings.filterwarnings("ignore", category=category)
    return saved


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kpl`` command. Returns the exit code (0 ok, 1 KB validation errors, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        saved = _setup_logging(args.verbose)
        try:
            return int(args.func(args) or 0)
        except KPLError as exc:
            message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            print(f"kpl: error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # pragma: no cover
            print("kpl: interrupted", file=sys.stderr)
            return 130
        finally:
            log.handlers[:] = saved[0]
            log.setLevel(saved[1])
            log.propagate = saved[2]


if __name__ == "__main__":
    sys.exit(main())
