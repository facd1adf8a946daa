"""Parameter constraints, declared once next to the field they constrain, and the tensor checks of every stage.

scikit-learn's ``validate_params`` (``Interval``, ``StrOptions``) is the model. A config dataclass declares each field
with :func:`param`::

    k: int = param(8, Interval(int, 1), "descriptions kept per class (top-K of stage 1)")

and calls :func:`validate` in ``__post_init__``. The same declaration renders the error message ("k must be an
integer >= 1, got 0"), and gives the command line its option type, choices and help text (``kplib.cli``), so a
constraint is never written twice.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import KPLInputError

__all__ = ["Boolean", "Interval", "Options", "check", "check_descriptions", "check_embeddings", "check_marginal",
           "check_matrix", "param", "replace", "validate"]


@dataclass(frozen=True)
class Interval:
    """A real or integer value in an interval; ``None`` bounds are infinite. ``closed`` says which ends belong."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    closed: str = "both"  # "both" | "left" | "right" | "neither"

    def _ends(self) -> tuple[bool, bool]:
        return self.closed in ("both", "left"), self.closed in ("both", "right")

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        left, right = self._ends()
        return (math.isfinite(value) and (self.lo is None or value > self.lo or left and value == self.lo)
                and (self.hi is None or value < self.hi or right and value == self.hi))

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        left, right = self._ends()
        if self.hi is None:
            return what if self.lo is None else f"{what} {'>=' if left else '>'} {self.lo}"
        if self.lo is None:
            return f"{what} {'<=' if right else '<'} {self.hi}"
        return f"{what} in {'[' if left else '('}{self.lo}, {self.hi}{']' if right else ')'}"


class Options:
    """One of a fixed set of values (strings)."""

    def __init__(self, *values: str):
        self.values = tuple(values)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


class Boolean:
    """True or False (not 0/1)."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "True or False"


POSITIVE = Interval(float, 0, None, closed="neither")
MODES = Options("reference", "corrected")
K_RULES = Options("running_min", "per_class")


def param(default: Any, constraint, help: str, *, none_ok: bool = False):
    """A dataclass field carrying its ``constraint``, whether ``None`` is allowed, and its ``help`` text."""
    return dataclasses.field(default=default, metadata={"constraint": constraint, "none_ok": none_ok, "help": help})


def check(name: str, value: Any, constraint, none_ok: bool = False) -> Any:
    """Return ``value`` if ``constraint`` accepts it (or it is None and ``none_ok``), else raise KPLInputError."""
    if (value is None and none_ok) or constraint.accepts(value):
        return value
    alt = " or None" if none_ok else ""
    raise KPLInputError(f"{name} must be {constraint.describe()}{alt}, got {value!r}")


def replace(config: Any, **overrides: Any) -> Any:
    """``dataclasses.replace(config, **overrides)``, refusing names that are not fields of ``config``'s class."""
    valid = [f.name for f in dataclasses.fields(config)]
    if unknown := sorted(set(overrides) - set(valid)):
        raise KPLInputError(f"unknown {type(config).__name__} field(s) {unknown}; valid fields: {valid}")
    return dataclasses.replace(config, **overrides)


def validate(obj: Any) -> None:
    """Check every field of dataclass ``obj`` declared with :func:`param`."""
    for f in dataclasses.fields(obj):
        if "constraint" in f.metadata:
            check(f.name, getattr(obj, f.name), f.metadata["constraint"], f.metadata["none_ok"])


# ----------------------------------------------------------------------------------------------- tensor checks
def check_matrix(x: Any, name: str, cols: int | None = None) -> Tensor:
    """A finite 2-D float tensor with at least one row (numpy arrays accepted; float32/float64 kept, else float32)."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise KPLInputError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc
    if x.device.type != "cpu":
        raise KPLInputError(f"{name} is on device {x.device}; kplib's method stages compute on the CPU (their solvers "
                            f"are SciPy's and POT's NumPy ones): pass {name}.cpu(). A GPU pays off in encoding, "
                            "whose embeddings pipeline.embed_images returns on the CPU.")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.ndim != 2 or x.shape[0] == 0:
        raise KPLInputError(f"{name} must be a non-empty 2-D matrix (rows × features), got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise KPLInputError(f"{name} has {x.shape[1]} columns, expected {cols} (embedding dimensions must match)")
    # a NaN or ±inf anywhere makes the sum non-finite (finite values can overflow it too: then count exactly)
    bad = 0 if torch.isfinite(x.sum()) else sum(int((~torch.isfinite(c)).sum()) for c in x.reshape(-1).split(1 << 22))
    if bad:
        raise KPLInputError(f"{name} contains {bad} NaN/Inf value(s); clean or re-encode the input")
    return x


def check_embeddings(x: Any, name: str, dim: int | None = None) -> Tensor:
    """Embeddings: a finite matrix with no all-zero row (a zero row has no direction and cannot be normalised)."""
    x = check_matrix(x, name, cols=dim)
    zero = (torch.linalg.vector_norm(x, dim=1) == 0).nonzero().flatten()
    if zero.numel():
        raise KPLInputError(f"{name} has {zero.numel()} all-zero row(s) (first: row {int(zero[0])}); every "
                            "embedding needs a direction — re-encode those items")
    return x


def unit(x: Tensor, *, exact: bool = True) -> Tensor:
    """Rows scaled to unit L2 norm (``torch.nn.functional.normalize``, as the released code calls it).

    ``exact=False`` returns ``x`` itself when every row is unit length already (to the 16 eps ``normalize`` leaves),
    sparing an N×d copy that would change rounding only. Reference mode always normalises, as released.
    """
    if not exact and x.ndim == 2 and x.is_floating_point() and \
            float((torch.linalg.vector_norm(x, dim=1) - 1).abs().max()) <= 16 * torch.finfo(x.dtype).eps:
        return x
    return F.normalize(x, dim=-1)


def check_descriptions(descs: Any, dim: int, class_names: Sequence[str] | None = None) -> list[Tensor]:
    """Ragged per-class description embeddings: one non-empty (M_c, dim) matrix per class."""
    if isinstance(descs, Tensor) and descs.ndim == 3:
        descs = list(descs)
    if not isinstance(descs, (list, tuple)) or not descs:
        raise KPLInputError("description embeddings must be a non-empty list with one (M_c, d) tensor per class")
    out = []
    for c, d in enumerate(descs):
        label = f"class {c}" + (f" ({class_names[c]!r})" if class_names is not None and c < len(class_names) else "")
        if isinstance(d, Tensor) and (d.ndim != 2 or d.shape[0] == 0):
            raise KPLInputError(f"{label} has no descriptions (shape {tuple(d.shape)}); every class needs at least "
                                "one description in the knowledge base")
        out.append(check_embeddings(d, f"description embeddings of {label}", dim=dim))
    return out


def check_marginal(q: Any, n: int, name: str = "class_marginal") -> Tensor:
    """A strictly positive vector of ``n`` class shares, returned normalised to sum to 1."""
    q = torch.as_tensor(q, dtype=torch.float64).flatten()
    if q.numel() != n:
        raise KPLInputError(f"{name} must have {n} entries (one per class), got {q.numel()}")
    if not torch.isfinite(q).all() or (q <= 0).any():
        zero = torch.nonzero(~(q > 0)).flatten().tolist()
        raise KPLInputError(f"{name} must be finite and strictly positive (a class of share 0 can hold no image); "
                            f"class index(es) {zero} are not")
    return q / q.sum()
