"""The README and docs/ keep up with the code: every setting is documented, every link
leads somewhere that exists, and every command they show is one the tools accept."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from service.cli.main import parser as cli_parser
from service.contract.settings import Settings
from tests.helpers import REPO

ROOT = REPO
DOCUMENTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_REPO_FILE = re.compile(r"^(tests|deploy|examples|tools|\.ci)/[\w./-]+\.(py|sh|ya?ml|json|png)$")
# The README is the first screen and the paths; reference material lives in docs/.
README_MAX_LINES = 300


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a document's headings."""
    found = set()
    prose = _FENCE.sub("", markdown)
    for line in prose.splitlines():
        if re.match(r"^#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_every_setting_is_in_the_settings_table() -> None:
    text = (ROOT / "docs" / "settings.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`")
        for line in text.splitlines()
        if line.startswith("| `GRADCAM_")
    }
    assert {f"GRADCAM_{name.upper()}" for name in Settings.model_fields} <= rows


def test_the_readme_reads_in_minutes() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES
    first_screen = "\n".join(lines[:60])
    assert "<img" in first_screen and "pip install" in first_screen


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_somewhere(document: Path) -> None:
    text = document.read_text()
    broken = []
    for match in _LINK.finditer(_FENCE.sub("", text)):
        target = match.group(1) or match.group(2)
        if re.match(r"^(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{document.name}: " + "; ".join(broken)


def _shell_commands(text: str) -> list[list[str]]:
    """Each command line of the sh/console blocks, split as the shell would (up to a
    pipe, redirection or &&), continuation lines joined."""
    commands = []
    for language, block in _FENCE.findall(text):
        if language not in ("sh", "console", "bash"):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].removeprefix("$ ").strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"\s(?:\||&&|;)\s", line):
                try:
                    words = shlex.split(part)
                except ValueError:
                    continue
                if any(w.startswith("[") for w in words):
                    continue  # a synopsis ("serve [--port P]"), not a command
                cut = [i for i, w in enumerate(words) if w in ("&", "2>&1") or w[0] in "><"]
                commands.append(words[: cut[0]] if cut else words)
    # And the commands quoted in prose: `gradcam-service explain ... --out DIR`.
    for span in re.findall(r"`(gradcam-service [^`]+)`", _FENCE.sub("", text)):
        words = shlex.split(span.split(" > ")[0])
        # "`gradcam-service body` writes ..." names a command; longer spans are commands.
        if "[" not in span and "..." not in span and len(words) > 2:
            commands.append(words)
    return commands


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_is_accepted(document: Path) -> None:
    """gradcam-service lines parse with the real argument parser; scripts and files the
    commands name exist."""
    parser = cli_parser()
    wrong = []
    for words in _shell_commands(document.read_text()):
        if words and words[0] == "gradcam-service":
            try:
                parser.parse_args(words[1:])
            except SystemExit as stop:
                if stop.code != 0:
                    wrong.append(" ".join(words))
        for word in words:
            if _REPO_FILE.match(word) and not (ROOT / word).exists():
                wrong.append(f"{' '.join(words)}: {word} does not exist")
    assert not wrong, "\n".join(wrong)


def test_the_command_check_sees_the_commands_and_refuses_a_wrong_one() -> None:
    shown = [
        w for d in DOCUMENTS for w in _shell_commands(d.read_text()) if w[:1] == ["gradcam-service"]
    ]
    assert len(shown) >= 8
    with pytest.raises(SystemExit):
        cli_parser().parse_args(["explain", "x.png", "--method", "gradcm"])
