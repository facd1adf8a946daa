"""``kpl``: KPL and its baselines on image folders, from the command line. It calls :mod:`kplib.pipeline`.

Examples::

    kpl run malaria_cells --method kpl_corrected --predictions preds.csv --output result.json
    kpl run ./export --method zero_shot --classes normal,pneumonia --model ./my_clip     # unlabelled images
    kpl compare brain_tumor_mri --methods kpl_corrected,kpl_random_words,kpl_shuffled,transclip,clip_dn
    kpl merge results/*.json                 # one table from several --output files
    kpl datasets | kpl audit FOLDER | kpl kb validate FILE | kpl encode FOLDER

The options of every method's switches are generated from the configs' declared fields (``--k``, ``--tau-t``,
``--transclip-n-neighbors`` ...); an option that does not apply to the chosen method is an error. User errors print
one line on stderr and exit with code 2. Output files are deterministic (run metadata goes to ``<name>.meta.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from .. import __version__
from ..errors import KPLError, KPLInputError, StandInWarning
from ..io.datasets import display_path, load_dataset
from ..io.encoders import DTYPES, STANDIN_LABEL, load_encoder
from ..io.knowledge import KPL_TEMPLATE, load_kb
from ..method.methods import METHODS, KPLConfig
from ..params import MODES, Boolean, Interval, Options, check
from ..pipeline import Experiment, compare, embed_images, run
from . import data as data_cli
from . import kb as kb_cli

log = logging.getLogger("kplib")

_PREFIX = {"KPLConfig": "", "TransCLIPConfig": "transclip-", "CLIPDNConfig": "dn-"}
_SHARED = {"mode", "seed"}  # their own options: --mode (checked against the method), --seed (everything seeded)
_CONFIGS = list(dict.fromkeys(spec.config for spec in METHODS.values()))


def _flag(cls: type, name: str) -> str:
    return "--" + _PREFIX.get(cls.__name__, cls.__name__.lower() + "-") + name.replace("_", "-")


def _checked(name: str, constraint: Interval):
    """An argparse ``type`` that parses and checks against the declared constraint (argparse names the flag)."""
    def parse(text: str):
        try:
            return check(name, constraint.kind(text), constraint)
        except ValueError as exc:  # KPLInputError is one too
            raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, KPLInputError)
                                             else f"{name} must be {constraint.describe()}, got {text!r}") from None
    return parse


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """One option per declared config field, with its constraint's type/choices and its help text."""
    p.add_argument("--mode", choices=MODES.values,
                   help="reference: the released computation; corrected: what the method intends (methods kpl, "
                        "inmap and the kpl_<control> ones)")
    for cls in _CONFIGS:
        group = p.add_argument_group(f"{cls.__name__} options")
        for f in dataclasses.fields(cls):
            if f.name in _SHARED or "constraint" not in f.metadata:
                continue
            c, flag, dest = f.metadata["constraint"], _flag(cls, f.name), f"{cls.__name__}.{f.name}"
            helptext = f.metadata["help"] + f" (default {f.default})"
            if isinstance(c, Boolean):
                kw = {"action": argparse.BooleanOptionalAction}
            elif isinstance(c, Options):
                kw = {"choices": c.values}
            else:
                kw = {"type": _checked(f.name, c), "metavar": f.name.upper()}
            group.add_argument(flag, dest=dest, help=helptext, **kw)


def _configs(args, methods: Sequence[str]) -> tuple:
    """The configs the options ask for; an option no chosen method uses is an error that says why."""
    out = []
    for cls in _CONFIGS:
        kw = {k.split(".", 1)[1]: v for k, v in vars(args).items()
              if k.startswith(cls.__name__ + ".") and v is not None}
        for name in kw:
            if not any(METHODS[m].uses is None or name in METHODS[m].uses for m in methods if METHODS[m].config is cls):
                raise KPLInputError(f"{_flag(cls, name)} does not apply to method(s) {', '.join(methods)}; drop it")
        if "seed" in cls.__dataclass_fields__:
            kw["seed"] = args.seed
        if cls is KPLConfig and args.mode is not None:
            kw["mode"] = args.mode
        out.append(cls(**kw))
    if args.mode is not None:
        for m in methods:
            spec = METHODS[m]
            if not spec.modes or spec.fixed_mode is not None:
                why = f"already fixes the mode to {spec.fixed_mode}" if spec.modes else "has no modes"
                raise KPLInputError(f"--mode {args.mode} does not apply: method {m} {why}; drop --mode, or use "
                                    f"--method kpl --mode {args.mode}")
    return tuple(out)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="FOLDER_OR_DATASET",
                   help="a registered dataset (`kpl datasets`) or an image folder: <folder>/<class>/<image>, "
                        "<folder>/<split>/<class>/<image>, or unlabelled images with --classes / --unlabelled")
    p.add_argument("--model", default="auto",
                   help="CLIP checkpoint: hub id or save_pretrained folder; 'standin' for the untrained stand-in; "
                        "'auto' (default): $KPL_MODEL, else the stand-in with a loud warning")
    p.add_argument("--kb", metavar="FILE_OR_NAME",
                   help="knowledge base file or curated name (default: the dataset's curated one; zero_shot: none)")
    p.add_argument("--device", help="torch device, e.g. cuda or cpu (default: $KPL_DEVICE, else cuda when available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="encoder precision (bfloat16 runs the forward under autocast)")
    p.add_argument("--batch-size", type=_checked("batch_size", Interval(int, 1)), default=32,
                   help="images per forward pass (default 32)")
    p.add_argument("--limit-per-class", type=_checked("limit_per_class", Interval(int, 1)), metavar="N",
                   help="a seeded random subset of at most N images per class")
    p.add_argument("--seed", type=_checked("seed", Interval(int, 0)), default=0,
                   help="seed of the subset, the methods and the bootstrap (default 0)")
    p.add_argument("--threads", type=_checked("threads", Interval(int, 1)), metavar="N",
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--template", default=KPL_TEMPLATE,
                   help="prompt around each description, with {class_name} and {description} (default: the "
                        "released template)")
    p.add_argument("--n-bootstrap", type=_checked("n_bootstrap", Interval(int, 0)), default=1000, metavar="B",
                   help="bootstrap resamples of the intervals and paired tests (default 1000)")
    p.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                   help="unreadable images: stop with an error listing them (default), or skip them")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding store")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    data_cli.add_dataset_args(p)
    _add_config_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kpl", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Environment: KPL_MODEL, KPL_DEVICE, KPL_DATA_ROOT, KPL_CACHE_DIR, "
                                            "KPL_TOKENIZER_DIR, KPL_DESCRIPTORS_ROOT.")
    parser.add_argument("--version", action="version", version=f"kplib {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    methods = "; ".join(f"{name}: {spec.summary}" for name, spec in METHODS.items())
    p = sub.add_parser("run", help="run one method on a folder and evaluate it", description=f"Methods — {methods}.")
    _add_run_args(p)
    p.add_argument("--method", default="kpl_corrected", choices=list(METHODS), help="default kpl_corrected")
    p.add_argument("--predictions", metavar="FILE.csv|FILE.json", help="write per-image predictions")
    p.add_argument("--output", metavar="FILE.json",
                   help="write {dataset, model, method, config, metrics} (merge several with `kpl merge`)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare", help="run several methods on the same embeddings, with paired tests",
                       description=f"Methods — {methods}.")
    _add_run_args(p)
    p.add_argument("--methods", required=True, metavar="A,B,...", help="comma-separated method names")
    p.add_argument("--reference", help="the method the others are tested against (default: first)")
    p.add_argument("--output", metavar="FILE.csv", help="write the table")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("encode", help="fill the embedding store for a folder (no method)")
    _add_run_args(p)
    p.add_argument("--save", metavar="FILE.pt", help="also write the embeddings, labels and paths")
    p.set_defaults(func=cmd_encode)
    p = sub.add_parser("merge", help="one table from several `kpl run --output` files")
    p.add_argument("files", nargs="+", metavar="FILE.json")
    p.add_argument("--output", metavar="FILE.csv", help="write the table as CSV")
    p.set_defaults(func=cmd_merge)
    data_cli.register(sub)
    kb_cli.register(sub)
    return parser


# ------------------------------------------------------------------------------------------------ commands
def _inputs(args) -> dict:
    """The images, the encoder and the keyword options of :func:`~kplib.pipeline.embed_images` (and ``run``,
    ``compare``) that the command line asks for."""
    if args.threads:
        torch.set_num_threads(args.threads)
    options = data_cli.dataset_options(args)
    if options["labelled"] is False and options["classes"] is None and args.kb:
        options["classes"] = load_kb(args.kb).class_names  # unlabelled images of the knowledge base's classes
    return {"dataset": load_dataset(args.dataset, limit_per_class=args.limit_per_class, seed=args.seed, **options),
            "encoder": load_encoder(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size),
            "cache": not args.no_cache, "on_error": args.on_error, "max_pixels": args.max_pixels,
            "progress": sys.stderr.isatty() if args.progress is None else args.progress}


def _table(df: pd.DataFrame) -> str:
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        return df.to_string()


def _describe(exp: Experiment) -> str:
    return (f"{len(exp.images)} images of {exp.images.folder.name}, encoder {exp.images.encoder.label}; "
            f"knowledge base {exp.text.meta.get('kb_id') or 'none (class names)'}")


def cmd_run(args) -> int:
    configs = _configs(args, [args.method])
    predictions = _outputs(args.predictions, (".csv", ".json"), "--predictions")
    output = _outputs(args.output, (".json",), "--output")
    exp = run(method=args.method, kb=args.kb, config=configs, n_bootstrap=args.n_bootstrap, template=args.template,
              **_inputs(args))
    m, stats = exp.metrics, exp.images.stats
    print(f"{exp.result.method}: {_describe(exp)}")
    print(f"embeddings: {stats.get('hits', 0)} from the store, {stats.get('n_encoded', 0)} encoded")
    if m is None:
        print("unlabelled images: no metrics (write the predictions with --predictions)")
    else:
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            lo, hi = m[f"{key}_ci"]
            print(f"  {key:18s} {100 * m[key]:6.2f} %  (95% bootstrap interval {100 * lo:.2f}–{100 * hi:.2f})")
    if predictions:
        write_predictions(predictions, exp)
    if output:
        output.write_text(json.dumps(exp.summary(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def cmd_compare(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise KPLInputError(f"unknown method(s) {unknown} in --methods; known: {', '.join(METHODS)}")
    configs = _configs(args, methods)
    out = _outputs(args.output, (".csv",), "--output")
    cmp = compare(methods=methods, kb=args.kb, config=configs, reference=args.reference, n_bootstrap=args.n_bootstrap,
                  template=args.template, **_inputs(args))
    first = next(iter(cmp.experiments.values()))
    print(_describe(first))
    table = cmp.table()
    print(_table(table))
    if out:
        table.assign(encoder=first.images.encoder.label, dataset=first.images.folder.name).to_csv(out)
    return 0


def cmd_encode(args) -> int:
    if any("." in k and v is not None for k, v in vars(args).items()) or args.mode:
        raise KPLInputError("kpl encode runs no method: drop the method options")
    save = _outputs(args.save, (".pt",), "--save")
    if args.no_cache and save is None:
        raise KPLInputError("kpl encode fills the embedding store; with --no-cache it needs --save FILE.pt")
    emb = embed_images(**_inputs(args))
    counts = ", ".join(f"{c} {n}" for c, n in emb.folder.counts().items())
    print(f"{len(emb)} images of {emb.folder.name} ({counts or 'unlabelled'}) embedded with {emb.encoder.label}: "
          f"{emb.stats.get('hits', 0)} from the store, {emb.stats.get('n_encoded', 0)} encoded; "
          f"{len(emb.folder.skipped)} skipped")
    if save:
        emb.save(save)
        print(f"saved to {save}")
    return 0


def cmd_merge(args) -> int:
    rows = []
    for name in args.files:
        try:
            d = json.loads(Path(name).read_text(encoding="utf-8"))
            rows.append({"dataset": d["dataset"], "method": d["method"], "model": d["model"],
                         **{k: v for k, v in (d.get("metrics") or {}).items() if not isinstance(v, list)}})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KPLInputError(f"{name} is not a `kpl run --output` file ({exc})") from None
    table = pd.DataFrame(rows).sort_values(["dataset", "method"]).reset_index(drop=True)
    print(_table(table))
    if args.output:
        table.to_csv(_outputs(args.output, (".csv",), "--output"), index=False)
    return 0


# ------------------------------------------------------------------------------------------------ files
def _outputs(text: str | None, suffixes: tuple[str, ...], flag: str) -> Path | None:
    if text is None:
        return None
    path = Path(text)
    if path.suffix.lower() not in suffixes:
        raise KPLInputError(f"{flag} {text!r} must end in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise KPLInputError(f"{flag} {text!r}: folder {path.parent} does not exist")
    return path


def write_predictions(path: Path, exp: Experiment) -> None:
    """Per-image predictions (CSV or JSON by suffix) and a ``<stem>.meta.json`` provenance sidecar.

    Paths are relative to the dataset folder in :func:`kplib.io.datasets.display_path` form (undecodable bytes
    escaped, never a crash); scores are the method's final logits with 9 significant digits, enough to reproduce the
    float32 argmax. Both files are deterministic.
    """
    folder, names, encoder = exp.images.folder, exp.images.class_names, exp.images.encoder
    labels = [None] * len(folder) if folder.labels is None else [names[y] for y in folder.labels.tolist()]
    scores = [[f"{v:.9g}" for v in row] for row in exp.result.logits.float().tolist()]
    records = [{"path": display_path(p, folder.root), "true_class": y, "predicted_class": names[k],
                "scores": dict(zip(names, map(float, s)))}
               for p, y, k, s in zip(folder.paths, labels, exp.result.predictions.tolist(), scores)]
    if path.suffix.lower() == ".csv":
        columns = ["path", "true_class", "predicted_class", *[f"score_{c}" for c in names], "encoder"]
        rows = [[r["path"], r["true_class"], r["predicted_class"], *s, encoder.label] for r, s in zip(records, scores)]
        text = pd.DataFrame(rows, columns=columns).to_csv(index=False, lineterminator="\n")
    else:
        text = json.dumps({"encoder": encoder.label, "is_standin": encoder.is_standin, "class_names": names,
                           "predictions": records}, indent=1, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8", newline="\n")
    path.with_name(path.stem + ".meta.json").write_text(
        json.dumps(exp.provenance(), indent=1, ensure_ascii=False, sort_keys=True, default=str) + "\n",
        encoding="utf-8", newline="\n")


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kpl``: exit 0 on success, 1 when a check finds problems (audit, kb validate), 2 on bad input."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kpl: %(levelname)s: %(message)s"))
    saved = list(log.handlers), log.level, log.propagate
    log.handlers[:], log.propagate = [handler], False
    log.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StandInWarning)
            code = int(args.func(args) or 0)
        if any(issubclass(w.category, StandInWarning) for w in caught):
            print(f"kpl: {STANDIN_LABEL.upper()} — not a result. Pass --model <hub id or folder> (or set KPL_MODEL) "
                  "for real numbers.", file=sys.stderr)
        return code
    except KPLError as exc:
        print("kpl: error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()),
              file=sys.stderr)
        return 2
    finally:
        log.handlers[:], log.propagate = saved[0], saved[2]
        log.setLevel(saved[1])
