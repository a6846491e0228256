"""How often generated images show each nuisance mode, as the attribute captioner measures it (issue: an
embedded testbed with a long tail inside classes). The paper's claim to check: Longtail Guidance finds the modes
that the guided classifier finds hard, so LTG data hold more of them than unguided data.

A mode is "seen" when the captioner says what it looks like: ``inverted`` (invert), ``faint`` (low contrast),
``small`` together with a horizontal and a vertical ``shifted ...`` (corner), ``cut off at the <edge> edge``
(cutoff), ``tilted left / right`` (rotate; also fires on 20% of clean Fashion-MNIST images, so compare shares,
not absolute values). Occlusion, blur and upside-down have no phrase and are not measured.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

MEASURED = ("invert", "low_contrast", "corner", "cutoff", "rotate")


def modes_in(phrases: Sequence[str]) -> set[str]:
    """The measurable modes one image's captioner phrases indicate (see the module docstring)."""
    said = set(phrases)
    found = set()
    if "inverted" in said:
        found.add("invert")
    if "faint" in said:
        found.add("low_contrast")
    horizontal = {"shifted left", "shifted right"} & said
    vertical = {"shifted up", "shifted down"} & said
    if "small" in said and horizontal and vertical:
        found.add("corner")
    if any(p.startswith("cut off at the ") for p in said):
        found.add("cutoff")
    if {"tilted left", "tilted right"} & said:
        found.add("rotate")
    return found


def mode_shares(images: Tensor, labels: Sequence[int], class_names: Sequence[str], captioner=None
                ) -> dict[str, dict[str, float]]:
    """Share of images showing each measured mode, per class name and over all (``"all"``).

    ``images [N, 1, H, W]`` in [-1, 1] (the generator's range), ``labels [N]`` class ids into ``class_names``.
    ``captioner``: an ``AttributeCaptioner`` (default thresholds when None). Classes with no image are left out.
    Raises ``ValueError`` when ``images`` and ``labels`` differ in length.
    """
    from ..introspection.captioners import AttributeCaptioner

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    captioner = captioner or AttributeCaptioner()
    found = [modes_in(p) for p in captioner.phrases(images)] if len(images) else []
    groups: dict[str, list[set[str]]] = {"all": found}
    for label, modes in zip(labels, found, strict=True):
        groups.setdefault(class_names[int(label)], []).append(modes)
    return {name: {m: sum(m in f for f in sets) / len(sets) for m in MEASURED}
            for name, sets in groups.items() if sets}
