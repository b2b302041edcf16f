"""Opt-in masking of ID card, bank card, phone and email numbers in answers (GLMVISION_REDACT).

Kinds (the names of `glmvision.core.config.REDACT_KINDS`):

- ``cn_id``: a Chinese resident ID number: 17 digits and a check character (digit, ``X`` or ``x``)
  valid under ISO 7064 MOD 11-2, written contiguously or grouped 6-8-4.
- ``bank_card``: 13-19 digits, Luhn-valid, contiguous or in 2-5 groups joined by one kind of
  separator (4-4-4-4, 4-4-4-4-3, 6-13, 4-6-5...: every group but the last of 4 or more digits, the
  last of 3 or more), not touching an ASCII letter.
- ``phone``: a Chinese mobile number, ``1[3-9]`` and 9 more digits, grouped 3-4-4 or not,
  optionally after ``+86`` or ``86``.
- ``email``: an ordinary address, ``local@domain.tld``, of at most 254 characters.

Masking: each match keeps its last 4 characters and every other character becomes ``*``. In a
number the separators (space, hyphen) are not counted and stay in place; in an email every
character counts, ``@`` and ``.`` included::

    6222 0212 3456 7890 128  ->  **** **** **** ***0 128
    +86-138-0013-8000        ->  ***-***-****-8000
    11010519491231002X       ->  **************002X
    zhang.san@example.com    ->  *****************.com

The masked text has the length of the original.

Numbers are made of digit groups: maximal runs of digits, joined by a single space or hyphen. A
match is made of whole groups, so digits inside a longer contiguous run are never masked, nor is
the fraction or the integer part of a decimal (``0.4111111111111111``). Groups joined by separators
may hold several numbers (``13800138000 13900139000``, a card and then its expiry month): from each
group on, the longest span of whole groups that is a match is masked. Where kinds claim the same
span the first of `KINDS` wins (an 18-digit ID that is also Luhn-valid is a ``cn_id``); a longer
match wins over a shorter one starting at the same character.

Streaming: whether a match starts at a character is decided from the two characters before it and
a window after it that ends at the first character no enabled kind can contain (CJK text, most
punctuation, a space not between two digits; with email off also a letter, and a ``-`` or ``.`` not
between two digits) or after `MAX_HOLD` characters, whichever comes first. `redact` decides from the
same windows, so a `StreamRedactor` gives the same text for any split of it, and holds back at most
`MAX_HOLD` characters: a longer run that might still belong to a match is decided on its first
`MAX_HOLD` characters (no match is that long). Text that cannot start a match (CJK text,
punctuation, and letters when email is off) is emitted at once; a number, and with email on a
word, waits for the character after it.

Not recognised: full-width digits, and separators other than one space or one hyphen.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

# The kinds this module masks, in order of precedence; glmvision.core.config.REDACT_KINDS names the same.
KINDS = ("cn_id", "phone", "bank_card", "email")
MAX_HOLD = 256
MAX_EMAIL = 254
KEEP = 4

_DIGITS = frozenset(string.digits)
_LETTERS = frozenset(string.ascii_letters)
_LOCAL = frozenset(string.ascii_letters + string.digits + "._%+-")
_SEPARATORS = frozenset(" -")
_CONTEXT = 2  # characters before a match that decide it (a decimal's "3.")
# More digits than any kind has (19 for a card, 13 for a phone with its 86): stop reading groups.
_MAX_DIGITS = 21
_MAX_GROUPS = 5  # a card has at most 5 groups, a phone 4 ("86 138 0013 8000"), an ID 3
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_PHONE = re.compile(r"(?:\+?86[ -]?)?1[3-9][0-9](?:[ -]?[0-9]{4}){2}")
# Labels cannot hold ".", so each has one extent and backtracking stays linear per label.
_EMAIL = re.compile(
    r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,63}(?![A-Za-z0-9-])"
)

_Groups = list[tuple[int, int]]


def id_check_char(body: str) -> str:
    """The MOD 11-2 check character ("0"-"9" or "X") of the first 17 digits of a resident ID."""
    return _ID_CHECK[sum(int(digit) * weight for digit, weight in zip(body, _ID_WEIGHTS, strict=True)) % 11]


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn check."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def mask(span: str, kind: str) -> str:
    """`span` with all but its last 4 counted characters as "*" (number separators are kept)."""
    keep_separators = kind != "email"
    kept = 0
    out: list[str] = []
    for char in reversed(span):
        if keep_separators and char in _SEPARATORS:
            out.append(char)
        elif kept < KEEP:
            out.append(char)
            kept += 1
        else:
            out.append("*")
    return "".join(reversed(out))


class Redactor:
    """Masks the configured kinds in text."""

    def __init__(self, kinds: Sequence[str]) -> None:
        if isinstance(kinds, str):
            raise TypeError("kinds is a sequence of kind names, not one string")
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown redaction kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
        self.kinds: tuple[str, ...] = tuple(kind for kind in KINDS if kind in kinds)
        self._numbers = tuple(kind for kind in self.kinds if kind != "email")
        self._email = "email" in self.kinds
        self._phone = "phone" in self.kinds

        alphabet: set[str] = set()
        joiners: set[str] = set()
        starts: list[str] = []
        if self._numbers:
            alphabet |= _DIGITS | {"+"}
            if "cn_id" in self.kinds:
                alphabet |= {"X", "x"}
            joiners |= {" ", "-", "."}
            starts.append(r"(?<![0-9])[0-9]")
            if self._phone:
                starts.append(r"(?<![0-9])\+")
        if self._email:
            alphabet |= _LOCAL | {"@"}
            starts.append(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]")
        # A joiner is inside a window only between two digits ("138 0013", "3.14"); elsewhere it ends it.
        self._joiners = frozenset(joiners - alphabet)
        inside = re.escape("".join(sorted(alphabet | self._joiners)))
        stoppers = [f"[^{inside}]" if inside else "(?s:.)"]
        if self._joiners:
            joiner = "[" + re.escape("".join(sorted(self._joiners))) + "]"
            stoppers += [f"(?<![0-9]){joiner}", f"{joiner}(?![0-9])"]
        self._stopper = re.compile("|".join(stoppers))
        self._start = re.compile("|".join(starts)) if starts else None

    @property
    def enabled(self) -> bool:
        """Whether any kind is configured (otherwise text passes unchanged)."""
        return bool(self.kinds)

    def redact(self, text: str) -> str:
        """The text with every match of the configured kinds masked."""
        if not self.enabled:
            return text
        out, _ = self._scan(text, 0, True, None)
        return out

    def count(self, text: str) -> dict[str, int]:
        """Matches per configured kind in the text (each kind present, 0 when none)."""
        counts = dict.fromkeys(self.kinds, 0)
        if self.enabled:
            self._scan(text, 0, True, counts)
        return counts

    def stream(self) -> StreamRedactor:
        """A redactor for one streamed text."""
        return StreamRedactor(self)

    def _scan(self, text: str, pos: int, final: bool, counts: dict[str, int] | None) -> tuple[str, int]:
        """Mask text[pos:] as far as it is decided; return the output and where it stopped."""
        assert self._start is not None
        out: list[str] = []
        i = pos
        n = len(text)
        while i < n:
            found = self._start.search(text, i)
            if found is None:
                out.append(text[i:])
                i = n
                break
            if found.start() > i:
                out.append(text[i : found.start()])
                i = found.start()
            decision = self._decide(text, i, final)
            if decision is None:
                break
            length, kind = decision
            if kind is None:
                out.append(text[i])
            else:
                out.append(mask(text[i : i + length], kind))
                if counts is not None:
                    counts[kind] += 1
            i += length
        return "".join(out), i

    def _window_end(self, text: str, i: int, final: bool) -> int | None:
        """End of the window that decides a match at text[i]; None until the text has it."""
        n = len(text)
        limit = i + MAX_HOLD
        # One character past the limit, so that a joiner just before it sees what follows.
        found = self._stopper.search(text, i, min(n, limit + 1))
        if found is None or found.start() >= limit:
            if n >= limit:
                return limit
            return n if final else None
        j = found.start()
        if j == n - 1 and not final and text[j] in self._joiners and text[j - 1] in _DIGITS:
            return None  # "138 " may go on "138 0013"
        # The stopping character is in the window: a kind may look at what follows a match.
        return j + 1

    def _decide(self, text: str, i: int, final: bool) -> tuple[int, str | None] | None:
        """(length, kind) of the match at text[i], (1, None) for none; None while undecided."""
        end = self._window_end(text, i, final)
        if end is None:
            return None
        low = max(0, i - _CONTEXT)
        window = text[low:end]
        k = i - low
        best: tuple[int, str] | None = None
        if self._numbers:
            best = self._number_at(window, k)
        if self._email and (k == 0 or window[k - 1] not in _LOCAL):
            found = _EMAIL.match(window, k)
            if found is not None:
                length = found.end() - k
                if length <= MAX_EMAIL and (best is None or length > best[0]):
                    best = (length, "email")
        return best if best is not None else (1, None)

    def _number_at(self, w: str, k: int) -> tuple[int, str] | None:
        """(length, kind) of the longest number match starting at w[k], if any."""
        plus = w[k] == "+"
        first = k + 1 if plus else k
        n = len(w)
        if first >= n or w[first] not in _DIGITS or (k > 0 and w[k - 1] in _DIGITS):
            return None
        if plus and not self._phone:
            return None
        if k >= 2 and w[k - 1] == "." and w[k - 2] in _DIGITS:
            return None  # the fraction of a decimal
        groups: _Groups = []
        q = first
        digits = 0
        while True:
            start = q
            while q < n and w[q] in _DIGITS:
                q += 1
            groups.append((start, q))
            digits += q - start
            if (
                len(groups) == _MAX_GROUPS
                or digits > _MAX_DIGITS
                or q + 1 >= n
                or w[q] not in _SEPARATORS
                or w[q + 1] not in _DIGITS
            ):
                break
            q += 1
        for count in range(len(groups), 0, -1):
            found = self._number_kind(w, k, groups[:count], plus)
            if found is not None:
                return found
        return None

    def _number_kind(self, w: str, k: int, groups: _Groups, plus: bool) -> tuple[int, str] | None:
        """(length, kind) when the groups, from w[k] on, are a number of a configured kind."""
        end = groups[-1][1]
        if end + 1 < len(w) and w[end] == "." and w[end + 1] in _DIGITS:
            return None  # the integer part of a decimal
        digits = "".join(w[a:b] for a, b in groups)
        sizes = [b - a for a, b in groups]
        separators = {w[b] for _, b in groups[:-1]}
        after = w[end] if end < len(w) else ""
        for kind in self._numbers:
            if kind == "phone":
                if _PHONE.fullmatch(w, k, end):
                    return end - k, kind
            elif plus:
                continue
            elif kind == "cn_id":
                stop = _cn_id_end(w, groups, digits, sizes, separators)
                if stop is not None:
                    return stop - k, kind
            elif kind == "bank_card" and _is_card(digits, sizes, separators):
                before = w[k - 1] if k > 0 else ""
                if before not in _LETTERS and after not in _LETTERS:
                    return end - k, kind
        return None


def _cn_id_end(w: str, groups: _Groups, digits: str, sizes: list[int], separators: set[str]) -> int | None:
    """End of a resident ID made of the groups (its X included), None when they are not one."""
    if len(groups) == 1:
        shaped = sizes[0] in (17, 18)
    else:
        shaped = len(groups) == 3 and sizes[:2] == [6, 8] and sizes[2] in (3, 4) and len(separators) == 1
    if not shaped:
        return None
    end = groups[-1][1]
    if len(digits) == 18:
        body, check, stop = digits[:17], digits[17], end
    elif len(digits) == 17 and end < len(w) and w[end] in "Xx":
        body, check, stop = digits, "X", end + 1
        if stop < len(w) and w[stop] in _DIGITS:
            return None  # the X is inside a longer run of digits
    else:
        return None
    return stop if id_check_char(body) == check else None


def _is_card(digits: str, sizes: list[int], separators: set[str]) -> bool:
    """Whether digit groups of these sizes, joined by these separators, are a bank card number."""
    if not 13 <= len(digits) <= 19:
        return False
    if len(sizes) > 1 and (
        len(sizes) > _MAX_GROUPS or len(separators) != 1 or min(sizes[:-1]) < 4 or sizes[-1] < 3
    ):
        return False
    return luhn_valid(digits)


class StreamRedactor:
    """Redacts text arriving in pieces (a streamed answer), holding back only what could still be a match."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._buffer = ""  # the undecided text, after up to _CONTEXT characters already emitted
        self._pos = 0
        self._counts = dict.fromkeys(redactor.kinds, 0)

    @property
    def held(self) -> int:
        """Characters received and not yet emitted (at most MAX_HOLD)."""
        return len(self._buffer) - self._pos

    @property
    def counts(self) -> dict[str, int]:
        """Matches per configured kind emitted so far."""
        return dict(self._counts)

    def feed(self, piece: str) -> str:
        """Take the next piece; return the text that is safe to emit now."""
        if not self._redactor.enabled:
            return piece
        self._buffer += piece
        out, pos = self._redactor._scan(self._buffer, self._pos, False, self._counts)
        cut = max(0, pos - _CONTEXT)
        self._buffer = self._buffer[cut:]
        self._pos = pos - cut
        return out

    def flush(self) -> str:
        """Return the rest at the end of the text; the redactor is then ready for a new text."""
        if not self._redactor.enabled:
            return ""
        out, _ = self._redactor._scan(self._buffer, self._pos, True, self._counts)
        self._buffer = ""
        self._pos = 0
        return out
