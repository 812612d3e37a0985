"""Free text on the command line, taken exactly as the shell handed it.

Hydra reads `key=value` with its override grammar, where a comma makes a sweep, brackets a
list, quotes a quoted string and `${...}` an interpolation, and where characters outside its
alphabet (☃, a tab) do not parse at all. A prompt is the one value a user types as free text,
so the keys a tool names here are rewritten, before Hydra reads the command line, to a quoted
string whose value is the text exactly; every other key keeps Hydra's grammar.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def quoted(text: str) -> str:
    """`text` as a Hydra quoted value that composes back to `text` exactly."""
    # OmegaConf: a literal `${` is `\${`, and the backslashes right before it are doubled
    s = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    # Hydra: backslashes before a quote or the closing quote are doubled, the quote escaped
    s = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), s)
    return f"'{s}'"


def free_text(args: Sequence[str], keys: Sequence[str]) -> list[str]:
    """`args` with the values of `keys` (`key=...`, `+key=...`) quoted as free text."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") in keys:
            arg = f"{key}={quoted(value)}"
        out.append(arg)
    return out
