"""The bundled demo model meets its card's targets on a fresh held-out set."""

from __future__ import annotations

import pytest

from service.engine.runtime import Runtime
from tools.demo_model.evaluate import EVALUATION_SEED, evaluate
from tools.demo_model.train import TRAIN_SEED, VALIDATION_SEED

# Neither the training, the validation nor the model card's evaluation seed.
TEST_SEED = 90_210


@pytest.mark.slow
def test_auc_and_pointing_game_on_fresh_phantoms(runtime: Runtime) -> None:
    assert TEST_SEED not in (TRAIN_SEED, VALIDATION_SEED, EVALUATION_SEED)
    result = evaluate(runtime, count=240, seed=TEST_SEED, size=(256, 256), grow_px=8.0)
    assert min(result.positives.values()) >= 40  # enough of each finding to mean something
    assert result.mean_auc >= 0.95, result.auc
    assert result.pointing_game >= 0.90, (result.hits, result.positives)
