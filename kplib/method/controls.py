r"""Knowledge controls: does KPL's gain come from the *knowledge* in its descriptions?

WaffleCLIP (Roth et al., ICCV 2023) showed that averaging many prompts helps CLIP even when the "descriptions" are
random words. A control keeps everything of KPL — the prompt template with the class name, the number of descriptions
per class, K, stage 2 — and replaces only the description texts:

* ``random_words`` — each description replaced by a random-word / random-character sequence of similar length
  (seeded, :func:`kplib.method.baselines.random_descriptors`);
* ``shuffled`` — each class keeps its count but receives descriptions written for *other* classes;
* ``name_only`` — one prompt per class with an empty description: stage 2 on class-name proxies;
* ``generic`` — descriptions that fit any class of the modality (written by the project per modality family).

If KPL with the real knowledge base does no better than these, its gain is not the knowledge. The functions here
build the description *texts* (pure, seeded); :func:`kplib.pipeline.embed_knowledge` encodes them into
``TextEmbeddings.controls`` and ``run_method("kpl_<control>", ...)`` runs KPL on them; the simulator builds the same
sets as embeddings.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from ..errors import KPLInputError
from .baselines import random_descriptors

__all__ = ["CONTROLS", "shuffled_across_classes", "control_descriptions"]

T = TypeVar("T")
CONTROLS = ("random_words", "shuffled", "name_only", "generic")


def shuffled_across_classes(items: Sequence[Sequence[T]], seed: int = 0) -> list[list[T]]:
    """Each class keeps its count and receives items of the other classes only.

    Class :math:`c` draws its :math:`M_c` items uniformly without replacement from the pooled items of all other
    classes (with replacement when they hold fewer than :math:`M_c`). A strict permutation of the pool is impossible
    when one class holds more than half of the items, so the control samples instead; it is seeded.
    """
    rng = random.Random(seed)
    out = []
    for c, own in enumerate(items):
        others = [item for j, group in enumerate(items) if j != c for item in group]
        if not others:
            raise KPLInputError("shuffling needs at least two classes with descriptions")
        k = len(own)
        out.append(rng.sample(others, k) if k <= len(others) else [rng.choice(others) for _ in range(k)])
    return out


def control_descriptions(control: str, descriptions: Sequence[Sequence[str]], seed: int = 0,
                         generic: Sequence[str] | None = None) -> list[list[str]]:
    """The description texts of ``control`` for classes whose real descriptions are ``descriptions``.

    ``random_words`` draws one random descriptor per real description, with the same word count; ``generic``
    gives each class as many of the modality's ``generic`` descriptions as it has real ones (cycling through the
    list when it is shorter), in one seeded order shared by every class.
    """
    if control == "random_words":  # one random descriptor per description, with its word count
        return [random_descriptors(len(texts), word_counts=[max(1, len(t.split())) for t in texts],
                                   seed=seed * 1000 + c) for c, texts in enumerate(descriptions)]
    if control == "shuffled":
        return shuffled_across_classes(descriptions, seed)
    if control == "name_only":
        return [[""] for _ in descriptions]
    if control == "generic":  # the same seeded order of the modality's list for every class, M_c of them
        if not generic:
            raise KPLInputError("the generic control needs the modality's generic descriptions")
        order = random.Random(seed).sample(list(generic), len(generic))
        return [[order[j % len(order)] for j in range(len(texts))] for texts in descriptions]
    raise KPLInputError(f"unknown knowledge control {control!r}; known: {CONTROLS}")
