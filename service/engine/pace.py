"""The model loop's pace: seconds per image, one estimate per model.

The queue's admission (``batching.py``) turns the work ahead into seconds at this pace.
One figure for all models would be wrong by orders of magnitude where models differ: a
3-D DenseNet's volume costs what hundreds of the demo's radiographs cost, so one
volume batch would have turned every radiograph away for a while, and a batch of
radiographs would have let volumes in far beyond the queue's limit. Each model's pace
follows its own recent steps, smoothed so that one odd step does not swing it.
"""

from __future__ import annotations

# The weight of the newest step in a model's estimate.
_PACE_SMOOTHING = 0.2


class Pace:
    """Seconds per image of each model, from the steps the model loop timed."""

    def __init__(self) -> None:
        self._seconds_per_image: dict[str, float] = {}

    @property
    def known(self) -> bool:
        """Whether any step has been timed yet."""
        return bool(self._seconds_per_image)

    def learn(self, model: str, seconds: float, work: float) -> None:
        """Fold one step of ``work`` images of ``model`` that took ``seconds``."""
        if work <= 0:
            return
        pace = seconds / work
        before = self._seconds_per_image.get(model)
        self._seconds_per_image[model] = (
            pace if before is None else (1 - _PACE_SMOOTHING) * before + _PACE_SMOOTHING * pace
        )

    def of(self, model: str) -> float:
        """``model``'s seconds per image; a model not timed yet is taken to be as slow as
        the slowest one timed (its warm-up times it before the first request arrives)."""
        found = self._seconds_per_image.get(model)
        if found is not None:
            return found
        return max(self._seconds_per_image.values(), default=0.0)
