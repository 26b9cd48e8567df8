""" "Did you mean ...?": the close matches to a name that does not exist.

Used wherever a client or an operator names something (a model key, a layer, a class
label, a method, a heatmap format, a CLI choice): the message says the close matches,
and an error response carries them as ``suggestions``, so a client can offer them too.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# How alike a match must be (difflib's ratio); 0.6 finds one typo in a short name
# ("phantm" → "phantom", "gradcm" → "gradcam") without proposing unrelated words.
_CUTOFF = 0.6
_SHOWN = 3


def close_matches(given: str, known: Iterable[str]) -> list[str]:
    """Up to three names of ``known`` close to ``given``, the closest first; case is
    ignored when comparing ("ResNet" finds "resnet")."""
    by_folded: dict[str, str] = {}
    for name in known:
        by_folded.setdefault(name.casefold(), name)
    found = difflib.get_close_matches(given.casefold(), list(by_folded), n=_SHOWN, cutoff=_CUTOFF)
    return [by_folded[name] for name in found]


def did_you_mean(matches: list[str]) -> str:
    """`` Did you mean 'a' or 'b'?`` (with its leading space), or "" when there are none."""
    if not matches:
        return ""
    quoted = [f"'{name}'" for name in matches]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" or {quoted[-1]}"
    return f" Did you mean {listed}?"
