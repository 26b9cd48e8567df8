"""A sanity check's numbers, its verdict, and the table and JSON that show them (no torch).

The verdict: the method **passes** when the median Spearman correlation between the
original and the randomised maps is below ``THRESHOLD`` (0.5) by the step that has
randomised every layer between the explained layer and the output (the model's top
block(s); step 1 if there is none, or for a coarse grouping in which the explained
layer shares its block with the output). By then the class score is computed by
random weights, so a map that still ranks the pixels as the trained model did is not
explaining the trained model. Adebayo et al. (2018) ask the same of a method; they
show Grad-CAM passing and, e.g., Guided Backprop failing. A method that fails is
reported as failing: the table, the JSON and the verdict line all say so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

THRESHOLD = 0.5


@dataclass(frozen=True)
class Spread:
    """Median and inter-quartile range (linear interpolation) of some values."""

    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        q1, median, q3 = (float(v) for v in np.quantile(np.asarray(values), [0.25, 0.5, 0.75]))
        return cls(median, q1, q3)

    def text(self) -> str:
        return f"{self.median:6.3f} [{self.q1:6.3f}, {self.q3:6.3f}]"


@dataclass(frozen=True)
class Step:
    """Step ``index`` of the cascade: the original model (0), or the model with the
    ``index`` groups nearest the output re-initialised, the last of them ``layer``.

    ``spearman[i]`` and ``ssim[i]`` compare image ``i``'s map with its original map;
    ``constant[i]`` says the randomised map came out constant (all zero after the
    ReLU, say): its Spearman correlation, undefined, counts as 0 (it ranks nothing
    as the original did) and the table counts such maps.
    """

    index: int
    layer: str  # "" for step 0
    modules: tuple[str, ...]
    above_target: bool  # the group runs between the explained layer and the output
    spearman: tuple[float, ...]
    ssim: tuple[float, ...]
    constant: tuple[bool, ...]

    @property
    def spearman_spread(self) -> Spread:
        return Spread.of(self.spearman)

    @property
    def ssim_spread(self) -> Spread:
        return Spread.of(self.ssim)


@dataclass(frozen=True)
class SanityReport:
    """A whole cascade on some images (``sanity.run_sanity``)."""

    model: str
    layer: str
    method: str
    seed: int
    depth: int | None  # None: a group per parameterised layer (with its norm)
    images: tuple[str, ...]  # those compared, in the order of each step's values
    targets: tuple[str, ...]  # the class explained for each of them
    skipped: tuple[str, ...]  # images whose ORIGINAL map is constant: nothing to compare
    steps: tuple[Step, ...]
    threshold: float = THRESHOLD

    @property
    def pass_by(self) -> int:
        """The step by which the median Spearman correlation must be below the threshold:
        the last of the groups above the explained layer, at least 1."""
        above = 0
        for step in self.steps[1:]:
            if not step.above_target:
                break
            above = step.index
        return max(1, above)

    @property
    def first_below(self) -> int | None:
        """The first step whose median Spearman correlation is below the threshold."""
        for step in self.steps[1:]:
            if step.spearman_spread.median < self.threshold:
                return step.index
        return None

    @property
    def passed(self) -> bool:
        first = self.first_below
        return first is not None and first <= self.pass_by

    def verdict(self) -> str:
        """One line: PASS or FAIL, and where the correlation fell (or did not)."""
        needed = self.steps[self.pass_by]
        where = f"step {needed.index} ({needed.layer})"
        first = self.first_below
        subject = f"{self.method} at '{self.layer}' of model '{self.model}'"
        if self.passed and first is not None:
            fell = self.steps[first]
            return (
                f"PASS: {subject}: the median Spearman correlation falls below "
                f"{self.threshold:g} at step {first} ({fell.layer}: "
                f"{fell.spearman_spread.median:.3f}), required by {where}"
            )
        reached = needed.spearman_spread.median
        late = (
            f"; it falls below only at step {first} ({self.steps[first].layer})"
            if first is not None
            else "; it never falls below, even with every layer randomised"
        )
        return (
            f"FAIL: {subject}: the median Spearman correlation is still {reached:.3f} at "
            f"{where}, not below {self.threshold:g}{late}: the maps do not depend on "
            "the model's weights as an explanation of the model must"
        )

    def table(self) -> str:
        """The per-step table, one row per step, as printed by the CLI."""
        width = max([len("randomised down to"), *(len(s.layer) for s in self.steps)])
        lines = [
            f"model '{self.model}', layer '{self.layer}', method {self.method}, "
            f"{len(self.images)} image(s), seed {self.seed}",
            f"{'step':>4}  {'randomised down to':<{width}}  "
            f"{'Spearman median [IQR]':<24}  {'SSIM median [IQR]':<24}  constant",
        ]
        for step in self.steps:
            name = step.layer or "(original)"
            mark = "*" if step.index == self.pass_by else " "
            lines.append(
                f"{step.index:>4}{mark} {name:<{width}}  {step.spearman_spread.text():<24}  "
                f"{step.ssim_spread.text():<24}  {sum(step.constant):>8}"
            )
        lines.append(
            f"* the pass step: every layer above '{self.layer}' randomised; the median "
            f"Spearman correlation must be below {self.threshold:g} by then"
        )
        if self.skipped:
            lines.append(
                f"left out: {len(self.skipped)} image(s) whose original map is constant: "
                + ", ".join(self.skipped)
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Every number, per step and per image (``sanity.json``)."""

        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "model": self.model,
            "layer": self.layer,
            "method": self.method,
            "seed": self.seed,
            "depth": self.depth,
            "threshold": self.threshold,
            "pass_by_step": self.pass_by,
            "first_step_below_threshold": self.first_below,
            "passed": self.passed,
            "verdict": self.verdict(),
            "images": list(self.images),
            "targets": list(self.targets),
            "skipped_constant_original": list(self.skipped),
            "steps": [
                {
                    "step": step.index,
                    "layer": step.layer or None,
                    "modules": list(step.modules),
                    "above_target": step.above_target,
                    "spearman": vars(step.spearman_spread),
                    "ssim": vars(step.ssim_spread),
                    "constant_maps": sum(step.constant),
                    "per_image": [
                        {"spearman": finite(r), "ssim": finite(s), "constant": c}
                        for r, s, c in zip(step.spearman, step.ssim, step.constant, strict=True)
                    ],
                }
                for step in self.steps
            ],
        }
