"""The error every mistake in a model's entry of the models file becomes.

A ``ConfigError`` (so serve and the CLI report it and exit 2) whose text names the
model and the key to fix; shared by the steps of loading a model (``models``,
``model_architecture``, ``model_weights``, ``model_outputs``), each of which finds
different mistakes.
"""

from __future__ import annotations

from service.contract.errors import ConfigError


class ModelConfigError(ConfigError):
    """A mistake in model ``model``'s entry, at key ``key``."""

    def __init__(self, model: str, key: str, message: str) -> None:
        super().__init__(f"model '{model}', key '{key}': {message}")
