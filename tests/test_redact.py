"""Redaction of ID cards, bank cards, phones and emails: exact masks, checksums, and streaming."""

# Answers are Chinese: full-width punctuation around the numbers is what these tests are about.
# ruff: noqa: RUF001

from __future__ import annotations

import itertools
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmvision.core.config import REDACT_KINDS
from glmvision.postprocess import redact
from glmvision.postprocess.redact import MAX_EMAIL, MAX_HOLD, Redactor, StreamRedactor

ALL = list(REDACT_KINDS)
NUMBERS = ["cn_id", "bank_card", "phone"]
KNOWN_ID = "11010519491231002X"
KNOWN_CARD = "4111 1111 1111 1111"
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Checksums written independently of the module's: the MOD 11-2 weights are 2**(17 - i) mod 11.
def id_check(body: str) -> str:
    """The check character of 17 ID digits."""
    total = sum(int(d) * pow(2, 17 - i, 11) for i, d in enumerate(body))
    value = (12 - total % 11) % 11
    return "X" if value == 10 else str(value)


def luhn_ok(digits: str) -> bool:
    """Luhn check by doubling every second digit from the right."""
    doubled = "".join(str(int(d) * (2 if i % 2 else 1)) for i, d in enumerate(reversed(digits)))
    return sum(int(d) for d in doubled) % 10 == 0


def luhn_complete(prefix: str) -> str:
    """The prefix with the check digit that makes it Luhn-valid."""
    return next(prefix + d for d in string.digits if luhn_ok(prefix + d))


def make_id(body: str) -> str:
    """A valid ID from 17 digits."""
    return body + id_check(body)


def expected_mask(item: str, email: bool = False) -> str:
    """All but the last 4 counted characters as "*"; number separators kept."""
    counted = [i for i, c in enumerate(item) if email or c not in " -"]
    hidden = set(counted[:-4])
    return "".join("*" if i in hidden else c for i, c in enumerate(item))


def stream_all(redactor: Redactor, pieces: list[str]) -> str:
    """Feed the pieces through one stream and flush."""
    stream = redactor.stream()
    out = [stream.feed(piece) for piece in pieces]
    return "".join(out) + stream.flush()


def redactor(*kinds: str) -> Redactor:
    """A redactor for the kinds, all of them when none are named."""
    return Redactor(list(kinds) or ALL)


# --- configuration -------------------------------------------------------------------------------


def test_the_module_has_a_pattern_for_exactly_the_configurable_kinds() -> None:
    assert sorted(redact.KINDS) == sorted(REDACT_KINDS)
    samples = {"cn_id": KNOWN_ID, "bank_card": KNOWN_CARD, "phone": "13800138000", "email": "a.b@example.com"}
    for kind in REDACT_KINDS:
        alone = Redactor([kind])
        assert alone.count(samples[kind]) == {kind: 1}
        assert alone.redact(samples[kind]) != samples[kind]


def test_unknown_kinds_and_a_plain_string_are_refused() -> None:
    with pytest.raises(ValueError, match="passport"):
        Redactor(["cn_id", "passport"])
    with pytest.raises(TypeError):
        Redactor("cn_id")


def test_no_kinds_is_disabled_and_changes_nothing() -> None:
    off = Redactor([])
    assert not off.enabled and redactor().enabled
    text = f"身份证号：{KNOWN_ID} {KNOWN_CARD} 13800138000 a@b.com"
    assert off.redact(text) == text
    assert off.count(text) == {}
    stream = off.stream()
    assert isinstance(stream, StreamRedactor)
    assert stream.feed(text[:5]) == text[:5] and stream.feed(text[5:]) == text[5:] and stream.flush() == ""


def test_only_the_configured_kinds_are_masked() -> None:
    text = f"{KNOWN_ID}，{KNOWN_CARD}，13800138000，a.b@example.com"
    assert Redactor(["phone"]).redact(text) == f"{KNOWN_ID}，{KNOWN_CARD}，*******8000，a.b@example.com"
    assert Redactor(["email", "cn_id"]).redact(text) == (
        f"**************002X，{KNOWN_CARD}，13800138000，***********.com"
    )


def test_test_checksums_agree_with_known_values() -> None:
    assert make_id(KNOWN_ID[:17]) == KNOWN_ID
    assert luhn_ok("4111111111111111") and luhn_ok("6222021234567890128") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")


# --- cn_id ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (KNOWN_ID, "**************002X"),
        (KNOWN_ID.lower(), "**************002x"),
        ("110105 19491231 002X", "****** ******** 002X"),
        ("110105-19491231-002X", "******-********-002X"),
        ("ID11010519491231002X.", "ID**************002X."),
    ],
)
def test_a_valid_id_keeps_its_last_4(text: str, masked: str) -> None:
    assert Redactor(["cn_id"]).redact(text) == masked
    assert redactor().redact(text) == masked


@given(st.text(string.digits, min_size=17, max_size=17))
@PROPERTY
def test_every_checksum_valid_id_is_masked_and_every_other_check_is_not(body: str) -> None:
    valid = make_id(body)
    only_ids = Redactor(["cn_id"])
    assert only_ids.redact(f"号码{valid}。") == f"号码{'*' * 14}{valid[-4:]}。"
    for wrong in (c for c in "0123456789X" if c != valid[-1]):
        assert only_ids.redact(f"号码{body}{wrong}。") == f"号码{body}{wrong}。"


def test_an_id_with_a_wrong_check_digit_is_left_alone() -> None:
    wrong = KNOWN_ID[:17] + "1"
    only_ids = Redactor(["cn_id"])
    assert only_ids.redact(wrong) == wrong
    assert only_ids.count(wrong) == {"cn_id": 0}
    assert only_ids.redact("110105 19491231 0021") == "110105 19491231 0021"


def test_an_id_inside_a_longer_digit_run_is_left_alone() -> None:
    valid = make_id("44030019900307123")
    # Preconditions: the longer runs are no ID or card of their own.
    assert valid[-1] != "X" and not luhn_ok(valid + "0")
    assert make_id("9" + KNOWN_ID[:16]) != "9" + KNOWN_ID[:17]
    for text in ("12" + valid + "34", "9" + KNOWN_ID, valid + "0", KNOWN_ID + "5"):
        assert redactor().redact(text) == text, text


def test_grouped_ids_must_be_6_8_4() -> None:
    assert Redactor(["cn_id"]).redact("1101 0519 4912 3100 2X") == "1101 0519 4912 3100 2X"
    assert Redactor(["cn_id"]).redact("110105 19491231-002X") == "110105 19491231-002X"


# --- bank_card -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (KNOWN_CARD, "**** **** **** 1111"),
        ("4111-1111-1111-1111", "****-****-****-1111"),
        ("4111111111111111", "************1111"),
        ("6222 0212 3456 7890 128", "**** **** **** ***0 128"),
        ("6222021234567890128", "***************0128"),
        ("622202 1234567890128", "****** *********0128"),
        ("3782 822463 10005", "**** ****** *0005"),
    ],
)
def test_a_luhn_valid_card_keeps_its_last_4(text: str, masked: str) -> None:
    assert Redactor(["bank_card"]).redact(text) == masked
    assert redactor().redact(f"卡号：{text}。") == f"卡号：{masked}。"


@given(st.integers(12, 18).flatmap(lambda n: st.text(string.digits, min_size=n, max_size=n)))
@PROPERTY
def test_every_luhn_valid_number_of_13_to_19_digits_is_a_card(prefix: str) -> None:
    card = luhn_complete(prefix)
    only_cards = Redactor(["bank_card"])
    assert only_cards.redact(f"卡号{card}，") == f"卡号{'*' * (len(card) - 4)}{card[-4:]}，"
    wrong = card[:-1] + str((int(card[-1]) + 1) % 10)
    assert only_cards.redact(f"卡号{wrong}，") == f"卡号{wrong}，"


def test_a_luhn_invalid_card_is_left_alone() -> None:
    for text in ("4111 1111 1111 1112", "4111111111111112", "6222 0212 3456 7890 127"):
        assert redactor().redact(text) == text
        assert redactor().count(text)["bank_card"] == 0


def test_a_card_inside_a_longer_digit_or_letter_run_is_left_alone() -> None:
    for text in ("000" + "4111111111111111" + "000", "abc4111111111111111", "4111111111111111abc"):
        assert redactor().redact(text) == text, text


def test_a_decimal_is_not_a_card() -> None:
    for text in ("0.4111111111111111", "4111111111111111.5", "3.14 4111111111111111.25"):
        assert redactor().redact(text) == text, text
        assert Redactor(["bank_card"]).redact(text) == text, text
    assert redactor().redact("4111111111111111.") == "************1111."


def test_card_groups_need_one_separator_and_card_sizes() -> None:
    for text in ("4111 1111-1111 1111", "41 11 11 11 11 11 11 11", "4111 1111 1111 11 11"):
        assert Redactor(["bank_card"]).redact(text) == text, text


def test_a_grouped_run_may_hold_a_card_and_more_groups() -> None:
    assert redactor().redact("4111 1111 1111 1111 12/25") == "**** **** **** 1111 12/25"


def test_an_18_digit_id_that_is_also_luhn_valid_counts_as_an_id() -> None:
    both = next(
        make_id(body)
        for body in (f"{n:017d}" for n in itertools.count(11010519491231000))
        if make_id(body)[-1] != "X" and luhn_ok(make_id(body))
    )
    masked = "*" * 14 + both[-4:]
    assert redactor().redact(both) == masked
    assert redactor().count(both) == {"cn_id": 1, "phone": 0, "bank_card": 0, "email": 0}
    assert Redactor(["bank_card"]).count(both) == {"bank_card": 1}
    assert Redactor(["bank_card"]).redact(both) == masked


# --- phone ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("13800138000", "*******8000"),
        ("138 0013 8000", "*** **** 8000"),
        ("138-0013-8000", "***-****-8000"),
        ("+86 138 0013 8000", "*** *** **** 8000"),
        ("+86-138-0013-8000", "***-***-****-8000"),
        ("+8613800138000", "**********8000"),
        ("86 13800138000", "** *******8000"),
        ("+13800138000", "+*******8000"),
        ("19912345678", "*******5678"),
    ],
)
def test_a_mobile_number_keeps_its_last_4(text: str, masked: str) -> None:
    assert Redactor(["phone"]).redact(text) == masked
    assert redactor().redact(f"电话：{text}。") == f"电话：{masked}。"


def test_not_a_mobile_number() -> None:
    for text in ("12800138000", "1380013800", "138001380001", "913800138000", "138 00138 000", "1-38001380"):
        assert Redactor(["phone"]).redact(text) == text, text


def test_a_prefixed_number_counts_as_a_phone() -> None:
    assert redactor().count("+86 138 0013 8000") == {"cn_id": 0, "phone": 1, "bank_card": 0, "email": 0}


# --- email ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("zhang.san@example.com", "*****************.com"),
        ("li-si+tag@mail.example.com.cn", "*************************m.cn"),
        ("13800138000@163.com", "***************.com"),
        ("a@b.io", "**b.io"),
    ],
)
def test_an_email_keeps_its_last_4_characters(text: str, masked: str) -> None:
    assert Redactor(["email"]).redact(text) == masked
    assert redactor().redact(f"邮箱：{text}，") == f"邮箱：{masked}，"


def test_an_email_ends_before_sentence_punctuation() -> None:
    text = "Write to zhang.san@example.com. Or (wang@example.org)!"
    assert redactor().redact(text) == "Write to *****************.com. Or (************.org)!"


def test_not_an_email() -> None:
    for text in ("a@b", "user@localhost", "@example.com", "zhang.san@", "a@b.c", "x@y.com1"):
        assert Redactor(["email"]).redact(text) == text, text
    # A local part over 64 characters: no address, nor is its tail one.
    for text in ("a" * 65 + "@example.com", "a" * 70 + "1@example.com"):
        assert redactor().redact(text) == text


def test_an_email_longer_than_the_limit_is_left_alone() -> None:
    longest = "a" * 60 + "@" + "b" * (MAX_EMAIL - 65) + ".com"
    assert len(longest) == MAX_EMAIL
    assert redactor().redact(longest) == expected_mask(longest, email=True)
    too_long = "a" * 60 + "@" + "b" * (MAX_EMAIL - 64) + ".com"
    assert redactor().redact(too_long) == too_long


# --- several kinds in one text -------------------------------------------------------------------


def test_chinese_text_with_an_id_and_a_card() -> None:
    text = "身份证号：11010519491231002X，卡号 6222021234567890128"
    assert redactor().redact(text) == "身份证号：**************002X，卡号 ***************0128"
    assert redactor().count(text) == {"cn_id": 1, "phone": 0, "bank_card": 1, "email": 0}


def test_several_matches_in_one_text() -> None:
    text = (
        "姓名 张三 身份证 110105194912310021X 无效；"
        f"证件 {KNOWN_ID}，电话 13800138000 13900139000，卡 {KNOWN_CARD} 与 5500-0000-0000-0004；"
        "邮箱 zhang.san@example.com 和 li@example.cn。"
    )
    assert redactor().redact(text) == (
        "姓名 张三 身份证 110105194912310021X 无效；"
        "证件 **************002X，电话 *******8000 *******9000，"
        "卡 **** **** **** 1111 与 ****-****-****-0004；"
        "邮箱 *****************.com 和 *********e.cn。"
    )
    assert redactor().count(text) == {"cn_id": 1, "phone": 2, "bank_card": 2, "email": 2}


def test_masking_keeps_the_length() -> None:
    text = f"{KNOWN_ID} {KNOWN_CARD} +86 138 0013 8000 zhang.san@example.com"
    assert len(redactor().redact(text)) == len(text)


# --- generated texts -----------------------------------------------------------------------------

SEP = st.sampled_from([" ", "-"])
ids = st.builds(
    lambda body, lower, grouped, sep: _format_id(make_id(body), lower, grouped, sep),
    st.text(string.digits, min_size=17, max_size=17),
    st.booleans(),
    st.booleans(),
    SEP,
)
cards = st.builds(
    lambda prefix, layout, sep: _group(luhn_complete(prefix), layout, sep),
    st.integers(12, 18).flatmap(lambda n: st.text(string.digits, min_size=n, max_size=n)),
    st.sampled_from(["contiguous", "fours", "six"]),
    SEP,
)
phones = st.builds(
    lambda second, rest, prefix, grouped, sep: (
        prefix + (sep.join(["1" + second + rest[0], rest[1:5], rest[5:]]) if grouped else "1" + second + rest)
    ),
    st.sampled_from("3456789"),
    st.text(string.digits, min_size=9, max_size=9),
    st.sampled_from(["", "+86", "86", "+86 ", "86-", "+86-"]),
    st.booleans(),
    SEP,
)
emails = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join(labels)}.{tld}",
    st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=20),
    st.lists(
        st.builds(
            lambda head, tail: head + tail,
            st.sampled_from(string.ascii_lowercase + string.digits),
            st.text(string.ascii_lowercase + string.digits + "-", max_size=8),
        ),
        min_size=1,
        max_size=3,
    ),
    st.text(string.ascii_lowercase, min_size=2, max_size=6),
)
items = st.one_of(
    ids.map(lambda s: (s, "cn_id")),
    cards.map(lambda s: (s, "bank_card")),
    phones.map(lambda s: (s, "phone")),
    emails.map(lambda s: (s, "email")),
)
fillers = st.one_of(
    st.sampled_from(["，", "。", "：", " ", "\n", "卡号", "身份证号 ", "电话"]),
    st.sampled_from(["the card ", "ID", "3.14", "0.5", "+", "X"]),
    st.text("0123456789 -+.@Xxab身，", max_size=12),
)
kind_sets = st.lists(st.sampled_from(ALL), unique=True)


def _format_id(valid: str, lower: bool, grouped: bool, sep: str) -> str:
    if lower:
        valid = valid.lower()
    return sep.join([valid[:6], valid[6:14], valid[14:]]) if grouped else valid


def _group(card: str, layout: str, sep: str) -> str:
    if layout == "fours":
        # In groups of 4 only where the last group keeps 3 or more digits (4-4-4-3, 4-4-4-4, 4-4-4-4-3).
        return sep.join(card[i : i + 4] for i in range(0, len(card), 4)) if len(card) % 4 in (0, 3) else card
    if layout == "six" and len(card) >= 13:
        return card[:6] + sep + card[6:]
    return card


@given(st.lists(st.tuples(st.sampled_from(["，", "。", "、", "；"]), items), min_size=1, max_size=6))
@PROPERTY
def test_every_generated_match_is_masked_exactly(parts: list[tuple[str, tuple[str, str]]]) -> None:
    text = "".join(f"{punct}{item}" for punct, (item, _) in parts) + "。"
    masked = (f"{punct}{expected_mask(item, kind == 'email')}" for punct, (item, kind) in parts)
    expected = "".join(masked) + "。"
    assert redactor().redact(text) == expected
    # A card may also be a valid ID or an 86-prefixed phone, which then claims it: the total is firm.
    counts = redactor().count(text)
    assert sum(counts.values()) == len(parts)
    for kind in ("cn_id", "email"):
        assert counts[kind] >= sum(1 for _, (_, k) in parts if k == kind)


@given(st.lists(st.one_of(items.map(lambda pair: pair[0]), fillers), max_size=12), kind_sets, st.data())
@PROPERTY
def test_any_split_of_a_stream_gives_the_whole_text_redaction(
    fragments: list[str], kinds: list[str], data: st.DataObject
) -> None:
    text = "".join(fragments)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    whole = Redactor(kinds)
    expected = whole.redact(text)
    assert len(expected) == len(text)
    stream = whole.stream()
    out: list[str] = []
    for piece in pieces:
        out.append(stream.feed(piece))
        assert stream.held <= MAX_HOLD
    out.append(stream.flush())
    assert "".join(out) == expected
    assert stream.counts == whole.count(text)


@given(st.lists(st.one_of(items.map(lambda pair: pair[0]), fillers), max_size=8), kind_sets)
@PROPERTY
def test_feeding_one_character_at_a_time_gives_the_whole_text_redaction(
    fragments: list[str], kinds: list[str]
) -> None:
    text = "".join(fragments)
    assert stream_all(Redactor(kinds), list(text)) == Redactor(kinds).redact(text)


# --- streaming behaviour -------------------------------------------------------------------------


def test_text_without_digits_streams_unchanged_and_at_once() -> None:
    stream = Redactor(NUMBERS).stream()
    pieces = ["The answer", " is: 身份", "证上没有号码", "。X-ray, well-known.\n", "Done"]
    for piece in pieces:
        assert stream.feed(piece) == piece
        assert stream.held == 0
    assert stream.flush() == ""


def test_with_email_on_a_word_waits_only_for_the_character_after_it() -> None:
    stream = redactor().stream()
    assert stream.feed("中文立即输出，") == "中文立即输出，"
    assert stream.feed("Hello wor") == "Hello "
    assert stream.held == 3
    assert stream.feed("ld! ") == "world! "
    assert stream.feed("zhang.san@exa") == ""
    assert stream.feed("mple.com 好") == "*****************.com 好"
    assert stream.flush() == ""


def test_a_number_is_held_until_it_cannot_grow() -> None:
    stream = redactor().stream()
    assert stream.feed("卡号 4111 1111") == "卡号 "
    assert stream.feed(" 1111 1111") == ""
    assert stream.feed(" ") == ""  # a fifth group may still follow
    assert stream.feed("有效") == "**** **** **** 1111 有效"
    assert stream.counts["bank_card"] == 1


def test_flush_releases_the_rest_and_the_stream_starts_over() -> None:
    stream = redactor().stream()
    assert stream.feed("电话 1380013") == "电话 "
    assert stream.flush() == "1380013"
    assert stream.feed("13800138000") == ""
    assert stream.flush() == "*******8000"


def test_the_hold_back_is_bounded() -> None:
    for kinds, text in ((ALL, "a" * 1000 + "@x.com"), (NUMBERS, "1 " * 500), (ALL, "1-" * 500)):
        redactor_ = Redactor(kinds)
        stream = redactor_.stream()
        emitted = 0
        for char in text:
            emitted += len(stream.feed(char))
            assert stream.held <= MAX_HOLD
        assert emitted >= len(text) - MAX_HOLD
        assert emitted + len(stream.flush()) == len(text)
