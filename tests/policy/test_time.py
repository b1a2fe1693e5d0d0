"""Time windows: inclusive start, exclusive end, overnight, 24:00, time zones, DST, next flip."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from tunnel_server.access.policy import TimeWindow
from tunnel_server.config import ConfigError

from .util import at, policy

WEEKDAYS = frozenset(range(5))
EVERY_DAY = frozenset(range(7))
PARIS = ZoneInfo("Europe/Paris")
UTC = ZoneInfo("UTC")


def window(days: frozenset[int], start: str, end: str, tz: ZoneInfo = PARIS) -> TimeWindow:
    def seconds(text: str) -> int:
        hours, minutes = text.split(":")
        return int(hours) * 3600 + int(minutes) * 60

    return TimeWindow(days, seconds(start), seconds(end), tz)


OFFICE = window(WEEKDAYS, "08:00", "18:00")


@pytest.mark.parametrize(
    ("instant", "inside"),
    [
        ("2024-03-29T06:59:59Z", False),  # Friday 07:59:59 in Paris (CET)
        ("2024-03-29T07:00:00Z", True),  # 08:00:00: start is inclusive
        ("2024-03-29T16:59:59Z", True),
        ("2024-03-29T17:00:00Z", False),  # 18:00:00: end is exclusive
        ("2024-03-30T10:00:00Z", False),  # Saturday
        ("2024-04-02T06:00:00Z", True),  # Tuesday 08:00 CEST: summer time
        ("2024-04-02T05:59:59Z", False),
    ],
)
def test_boundaries(instant: str, inside: bool) -> None:
    assert OFFICE.contains(at(instant)) is inside


def test_time_zone_decides() -> None:
    new_york = window(EVERY_DAY, "09:00", "17:00", ZoneInfo("America/New_York"))
    tokyo = window(EVERY_DAY, "09:00", "17:00", ZoneInfo("Asia/Tokyo"))
    instant = at("2024-06-03T14:00:00Z")  # 10:00 in New York, 23:00 in Tokyo
    assert new_york.contains(instant)
    assert not tokyo.contains(instant)


def test_dst_spring_forward() -> None:
    every_day = window(EVERY_DAY, "08:00", "18:00")
    # Saturday 30 March opens at 07:00Z (CET); Sunday 31 March, after the switch, at 06:00Z.
    assert every_day.next_change(at("2024-03-29T20:00:00Z")) == at("2024-03-30T07:00:00Z")
    assert every_day.next_change(at("2024-03-30T20:00:00Z")) == at("2024-03-31T06:00:00Z")
    assert every_day.next_change(at("2024-03-31T06:00:00Z")) == at("2024-03-31T16:00:00Z")


def test_window_starting_in_the_skipped_hour_opens_at_the_jump() -> None:
    night = window(EVERY_DAY, "02:30", "04:00")
    assert not night.contains(at("2024-03-31T00:59:59Z"))  # 01:59:59 CET
    assert night.contains(at("2024-03-31T01:00:00Z"))  # the clock jumps to 03:00 CEST
    assert night.next_change(at("2024-03-31T00:00:00Z")) == at("2024-03-31T01:00:00Z")
    assert night.next_change(at("2024-03-31T01:00:00Z")) == at("2024-03-31T02:00:00Z")


def test_repeated_hour_follows_the_wall_clock() -> None:
    fold = window(EVERY_DAY, "02:00", "02:30")
    # 27 October: 02:00-03:00 happens twice (CEST from 00:00Z, then CET from 01:00Z).
    assert fold.contains(at("2024-10-27T00:15:00Z"))
    assert not fold.contains(at("2024-10-27T00:45:00Z"))
    assert fold.contains(at("2024-10-27T01:15:00Z"))
    assert not fold.contains(at("2024-10-27T01:45:00Z"))
    assert fold.next_change(at("2024-10-27T00:15:00Z")) == at("2024-10-27T00:30:00Z")
    assert fold.next_change(at("2024-10-27T00:45:00Z")) == at("2024-10-27T01:00:00Z")
    assert fold.next_change(at("2024-10-27T01:15:00Z")) == at("2024-10-27T01:30:00Z")


def test_overnight_window_belongs_to_its_start_day() -> None:
    friday_night = window(frozenset({4}), "22:00", "06:00", UTC)
    assert not friday_night.contains(at("2024-03-28T23:00:00Z"))  # Thursday night
    assert not friday_night.contains(at("2024-03-29T05:00:00Z"))  # Friday morning
    assert friday_night.contains(at("2024-03-29T22:00:00Z"))
    assert friday_night.contains(at("2024-03-30T05:59:59Z"))
    assert not friday_night.contains(at("2024-03-30T06:00:00Z"))
    assert not friday_night.contains(at("2024-03-30T22:00:00Z"))  # Saturday night
    assert friday_night.next_change(at("2024-03-30T01:00:00Z")) == at("2024-03-30T06:00:00Z")
    assert friday_night.next_change(at("2024-03-30T06:00:00Z")) == at("2024-04-05T22:00:00Z")


def test_end_of_day() -> None:
    evening = window(frozenset({0}), "20:00", "24:00", UTC)
    assert evening.contains(at("2024-04-01T23:59:59Z"))  # Monday
    assert not evening.contains(at("2024-04-02T00:00:00Z"))
    assert evening.next_change(at("2024-04-01T21:00:00Z")) == at("2024-04-02T00:00:00Z")


def test_weekly_next_change_and_never() -> None:
    monday = window(frozenset({0}), "08:00", "09:00", UTC)
    assert monday.next_change(at("2024-03-29T12:00:00Z")) == at("2024-04-01T08:00:00Z")
    always = window(EVERY_DAY, "00:00", "24:00", UTC)
    assert always.next_change(at("2024-03-29T12:00:00Z")) is None
    # Every day but Sunday, all day: opens Monday 00:00 after closing Sunday 00:00.
    not_sunday = window(frozenset(range(6)), "00:00", "24:00", PARIS)
    assert not_sunday.next_change(at("2024-03-29T12:00:00Z")) == at("2024-03-30T23:00:00Z")
    assert not_sunday.next_change(at("2024-03-30T23:00:00Z")) == at("2024-03-31T22:00:00Z")


def test_str() -> None:
    assert str(OFFICE) == "mon,tue,wed,thu,fri 08:00-18:00 Europe/Paris"


@pytest.mark.parametrize(
    ("time", "message"),
    [
        ('{start: "25:00"}', "time '25:00' is not between 00:00 and 24:00"),
        ('{start: "08:60"}', "time '08:60' is not between"),
        ('{start: "0800"}', "time '0800' must look like HH:MM"),
        ('{start: "08:00", end: "08:00"}', "empty window 08:00-08:00"),
        ('{start: "24:00", end: "08:00"}', "a window cannot start at 24:00"),
        ("{tz: Mars/Olympus}", "unknown time zone 'Mars/Olympus'"),
        ("{days: [funday]}", "access_levels.t.time.days[0]"),
        ("{days: []}", "access_levels.t.time.days"),
    ],
)
def test_time_load_errors(time: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy(f"access_levels:\n  t: {{time: {time}}}\n")
    assert message in str(info.value)
    assert str(info.value).startswith("policy.yaml: access_levels.t.time")
