"""CSV cells that a spreadsheet cannot run: every CSV qatflow writes passes the strings that come
from users' data (class names, file names, overrides) through `safe_cell`.

A spreadsheet reads a cell that begins with =, +, -, @, a tab or a carriage return as a formula
(`=cmd|' /C calc'!A0` runs a program), so such a cell gets a leading single quote, which makes it
text (OWASP's "CSV Injection" rule). Numbers are written as numbers and never pass through here: a
negative value stays a number.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_STARTS) else text
