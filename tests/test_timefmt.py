"""Timestamps as instants: ``instant_us``'s fast path for Tradecloud's own form gives the
answer, or the error, that the general path (:func:`parse_instant`) gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tcbridge.errors import InvalidEvent
from tcbridge.timefmt import instant_us, parse_instant

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def general(value: object) -> int:
    """The instant by the general path alone (what instant_us was before its fast path)."""
    delta = parse_instant(value) - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def outcome(read: object, value: object) -> tuple[str, object]:
    try:
        return "instant", read(value)  # type: ignore[operator]
    except InvalidEvent as e:
        return "refused", str(e)


offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes)))
moments = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59))


@st.composite
def stamps(draw: st.DrawFn) -> str:
    """Timestamps as senders write them: Tradecloud's form, offsets, other precisions,
    lower-case z, spaces around, no zone, a date alone, at the ends of the calendar."""
    moment = draw(moments)
    zone = draw(offsets)
    spec = draw(st.sampled_from(["milliseconds", "seconds", "microseconds", "auto"]))
    text = moment.replace(tzinfo=zone).isoformat(timespec=spec)
    form = draw(st.sampled_from(["as is", "Z", "z", "naive", "date", "spaced"]))
    if form in ("Z", "z"):
        text = moment.isoformat(timespec=spec) + form
    elif form == "naive":
        text = moment.isoformat(timespec=spec)
    elif form == "date":
        text = moment.date().isoformat()
    elif form == "spaced":
        text = f" {text}\t"
    return text


@given(stamps())
@example("2026-12-03T11:51:56.005Z")
@example("0001-01-01T00:00:00+01:00")  # before year 1 in UTC
@example("0001-01-01T00:00:00Z")
@example("9999-12-31T23:59:59.999999Z")
@example("9999-12-31T23:59:59-01:00")  # after year 9999 in UTC
@example("9999-12-31T23:59:59.999999-23:59")  # the widest offsets at both ends
@example("0001-01-01T00:00:00+23:59")
@example("2024-01-01T00:00:00+05:30:15.5")  # an offset with seconds
@example("2024-01-01T00:00:00.1234567890123Z")  # more digits than microseconds
@example("2024-W01-1T00:00Z")  # an ISO week date
@example("2024-01-01T00:00:00\ud800Z")  # a lone surrogate
@example("2024-05-01T12:00:00.000+02:00")
@example("2024-05-01T10:00:00.000z")
@example("20240501T100000Z")
@example("")
@example("yesterday")
def test_the_fast_path_agrees_with_the_general_one(value: str) -> None:
    assert outcome(instant_us, value) == outcome(general, value)


@pytest.mark.parametrize("value", [None, 17, ["2024-05-01T10:00:00Z"]])
def test_a_stamp_that_is_no_text_is_refused(value: object) -> None:
    with pytest.raises(InvalidEvent, match="must be a non-empty string"):
        instant_us(value)


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_an_instant_beyond_the_calendar_in_utc_is_refused(value: str) -> None:
    with pytest.raises(InvalidEvent, match="out of range"):
        instant_us(value)


def test_tradecloud_form_and_an_offset_give_one_instant() -> None:
    assert instant_us("2024-05-01T10:00:00.000Z") == instant_us("2024-05-01T12:00:00.000+02:00")
    assert instant_us("1970-01-01T00:00:00.001Z") == 1_000
