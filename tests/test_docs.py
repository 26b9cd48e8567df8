"""The README keeps up with the code: every setting is documented."""

from __future__ import annotations

from pathlib import Path

from service.contract.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_readme_settings_table() -> None:
    rows = {
        line.split("|")[1].strip().strip("`")
        for line in README.splitlines()
        if line.startswith("| `GRADCAM_")
    }
    assert {f"GRADCAM_{name.upper()}" for name in Settings.model_fields} <= rows
