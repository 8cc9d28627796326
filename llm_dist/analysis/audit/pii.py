"""PII counting and scrubbing: e-mail addresses, URLs, card-like numbers and phone numbers.

Patterns are applied in that order, each on the text left by the previous one, so a match is counted
once (an e-mail's domain is not also a URL; a card number is not also a phone number).

- email: `local@domain.tld`
- url: `http(s)://…` or `www.…` (trailing punctuation trimmed)
- card: 13–19 digits, optionally grouped by spaces or dashes, passing the Luhn check
- phone: 9–15 digits in 2–4-digit groups separated by spaces, dots or dashes (optionally `+cc` and an
  area code in parentheses) that start with `+`, `(` or `0`, or look like `NNN-NNN-NNNN`; runs of years
  (`1998 2004 2010`) are not phones

Heuristics, tuned for precision on news text: they miss unusual formats and are no substitute for a
dedicated PII tool (e.g. Presidio) on sensitive data.
"""
from __future__ import annotations

import re

KINDS = ("email", "url", "card", "phone")
TOKENS = {"email": "<EMAIL>", "url": "<URL>", "card": "<CARD>", "phone": "<PHONE>"}

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"'()\[\]]+", re.IGNORECASE)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,4}(?![\w-])")
_US = re.compile(r"\d{3}[.-]\d{3}[.-]\d{4}")
_YEAR = re.compile(r"(?:19|20)\d\d")
_MANY_DIGITS = re.compile(r"\d(?:[ .()+-]{0,2}\d){8}")  # cheap pre-check: 9+ digits close together


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _is_card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _is_phone(m: re.Match) -> bool:
    s = m.group()
    digits = re.sub(r"\D", "", s)
    if not 9 <= len(digits) <= 15:
        return False
    groups = re.split(r"[ .()+-]+", s.strip("+("))
    if all(_YEAR.fullmatch(g) for g in groups if g):
        return False
    return s[0] in "+(0" or bool(_US.fullmatch(s))


def _url_end(m: re.Match) -> str:
    return m.group().rstrip(".,;:!?")


def scrub(text: str, replace: bool = True) -> tuple[str, dict[str, int]]:
    """(`text` with each match replaced by `<EMAIL>`/`<URL>`/`<CARD>`/`<PHONE>`, counts per kind).
    With `replace=False` the text comes back as it was (counting only)."""
    counts = dict.fromkeys(KINDS, 0)
    if not text:
        return text, counts
    out = text

    def sub(kind: str, pattern: re.Pattern, keep=None) -> None:
        nonlocal out

        def repl(m: re.Match) -> str:
            if keep is not None and not keep(m):
                return m.group()
            if kind == "url":
                body = _url_end(m)
                counts[kind] += 1
                return TOKENS[kind] + m.group()[len(body):]
            counts[kind] += 1
            return TOKENS[kind]

        out = pattern.sub(repl, out)

    if "@" in out:
        sub("email", _EMAIL)
    low = out.lower()
    if "http" in low or "www." in low:
        sub("url", _URL)
    if _MANY_DIGITS.search(out):
        sub("card", _CARD, _is_card)
        sub("phone", _PHONE, _is_phone)
    return (out if replace else text), counts


def pii_counts(text: str) -> dict[str, int]:
    return scrub(text, replace=False)[1]
