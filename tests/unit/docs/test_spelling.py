"""Words users read are spelled right: the README and the other documents, the error
messages and everything else in service/ (codespell), and no doubled words ("this
this")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

ROOT = REPO
DOCUMENTS = [
    "README.md",
    "docs",
    "CONTRIBUTING.md",
    "openapi.yaml",
    "service",
    "deploy",
    "Dockerfile",
]
# Real words codespell does not know: an author (Draelos & Carin), a JPEG 2000 marker,
# the DICOM modality OT (other) and the HTTP header TE.
KNOWN = "carin,siz,ot,te"
_DOUBLED = re.compile(r"(?<![-\w])([A-Za-z]{2,}) \1\b")
_LITERALS = re.compile(r"``[^`]*``|`[^`]*`")


def test_codespell_finds_no_misspelling() -> None:
    codespell = Path(sys.executable).with_name("codespell")
    done = subprocess.run(
        [
            str(codespell),
            "--ignore-words-list",
            KNOWN,
            "--skip",
            "*.safetensors,*.json,*.png,*.dcm,*.txt",
            *DOCUMENTS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_doubled_words() -> None:
    paths = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "openapi.yaml"]
    paths += sorted((ROOT / "docs").glob("*.md"))
    paths += sorted((ROOT / "service").rglob("*.py")) + sorted((ROOT / "service").rglob("*.md"))
    found = [
        f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}"
        for path in paths
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for match in _DOUBLED.finditer(_LITERALS.sub("", line))
    ]
    assert not found, "\n".join(found)


def test_the_doubled_word_check_finds_one() -> None:
    assert _DOUBLED.search("a sentence with this this typo")
    assert not _DOUBLED.search("It is opt-in in the default run")
