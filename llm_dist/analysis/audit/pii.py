"""PII counting and scrubbing: e-mail addresses, URLs, Chinese resident identity numbers, card-like
numbers, mainland Chinese mobile numbers, phone numbers and Chinese-format addresses.

Patterns are applied in that order, each on the text left by the previous one, so a match is counted
once (an e-mail's domain is not also a URL; an identity number is not also a card; a card number is not
also a phone number).

- email: `local@domain.tld`
- url: `http(s)://…` or `www.…` (trailing punctuation trimmed)
- card: 13–19 digits, optionally grouped by spaces or dashes, passing the Luhn check
- cn_id: an 18-character mainland resident identity number (GB 11643-1999): 6-digit area code, birth date
  YYYYMMDD (1800–2099, a real month and day-of-month range), 3-digit sequence, check character 0–9 or X,
  **and the ISO 7064 MOD 11-2 check digit must hold** (a random 18-digit number passes 1 time in 11)
- cn_mobile: a mainland mobile number, 11 digits `1[3-9]x xxxx xxxx` (grouped 3-4-4 by spaces or dashes
  or not at all), optionally `+86` / `0086` before it
- cn_address: a Chinese street address: up to 4 administrative units (…省, …市, …区, …县, …镇, …) then a
  street (…路, …街, …大街, …大道, …道, …巷, …弄, …胡同) of at least 2 characters and a house number
  (`27号`, `27-3号`), then optional building/unit/floor/room parts (`3栋2单元501室`); names never start with
  or hold a function character (在, 住, 于, 到, 寄, 是, 的, 我, …) so "我住在北京市…" loses only the address
- phone: 9–15 digits in 2–4-digit groups separated by spaces, dots or dashes (optionally `+cc` and an
  area code in parentheses) that start with `+`, `(` or `0`, or look like `NNN-NNN-NNNN`; runs of years
  (`1998 2004 2010`) are not phones

Heuristics, tuned for precision on news text: they miss unusual formats and are no substitute for a
dedicated PII tool (e.g. Presidio) on sensitive data.
"""
from __future__ import annotations

import re

KINDS = ("email", "url", "card", "phone", "cn_id", "cn_mobile", "cn_address")
TOKENS = {"email": "<EMAIL>", "url": "<URL>", "card": "<CARD>", "phone": "<PHONE>", "cn_id": "<ID_NUMBER>",
          "cn_mobile": "<MOBILE>", "cn_address": "<ADDRESS>"}

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"'()\[\]]+", re.IGNORECASE)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,4}(?![\w-])")
_US = re.compile(r"\d{3}[.-]\d{3}[.-]\d{4}")
_YEAR = re.compile(r"(?:19|20)\d\d")
_MANY_DIGITS = re.compile(r"\d(?:[ .()+-]{0,2}\d){8}")  # cheap pre-check: 9+ digits close together
_CN_ID = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx]"
                    r"(?![0-9A-Za-z])")
_CN_MOBILE = re.compile(r"(?<![\d+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:([ -]?)\d{4}\1\d{4})(?!\d)")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
# address parts: CJK characters that may start / form a place name (no function characters: see docstring)
_NAME = "[^\\W\\d_A-Za-z在于至到住是的了与及从往向寄送发位处我你他她们请联系地址为：]"
_PLACE = f"(?:{_NAME}{{2,6}}?(?:特别行政区|自治区|自治州|自治县|省|市|地区|盟|州|区|县|旗|镇|乡|街道))"
_CN_ADDRESS = re.compile(f"{_PLACE}{{0,4}}{_NAME}(?:{_NAME}|\\d){{1,7}}?(?:大道|大街|胡同|路|街|道|巷|弄)"
                         f"\\d{{1,5}}(?:-\\d{{1,5}})?[号號](?:\\d{{1,5}}(?:号楼|栋|幢|座|楼|单元|层|室))*")
_ADDRESS_HINT = re.compile("[路街道巷弄同]\\d{1,5}(?:-\\d{1,5})?[号號]")


def cn_id_valid(number: str) -> bool:
    """The ISO 7064 MOD 11-2 check character of an 18-character resident identity number."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(c) * w for c, w in zip(number[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == number[17].upper()


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
    """(`text` with each match replaced by `<EMAIL>`/`<URL>`/`<CARD>`/`<PHONE>`/`<ID_NUMBER>`/`<MOBILE>`/
    `<ADDRESS>`, counts per kind).
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
        sub("cn_id", _CN_ID, lambda m: cn_id_valid(m.group()))
        sub("card", _CARD, _is_card)
        sub("cn_mobile", _CN_MOBILE)
        sub("phone", _PHONE, _is_phone)
    if _ADDRESS_HINT.search(out):
        sub("cn_address", _CN_ADDRESS)
    return (out if replace else text), counts


def pii_counts(text: str) -> dict[str, int]:
    return scrub(text, replace=False)[1]
