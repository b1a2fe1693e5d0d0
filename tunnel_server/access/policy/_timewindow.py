"""Weekly time windows in a time zone: membership by local wall-clock time, and the next flip.

Start is inclusive, end exclusive; ``end <= start`` is an overnight window that belongs to the
day it starts on. Across DST the wall clock decides: a window starting in a skipped hour opens
when the clock jumps past its start, and in a repeated hour the window follows the clock.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY = 86400
_HORIZON_DAYS = 8  # a weekly window flips within 7 days, or never


@dataclass(frozen=True)
class TimeWindow:
    """``days`` are Python weekdays (0 = Monday); ``start``/``end`` seconds after local midnight,
    ``end`` in (0, 86400] (86400 is ``24:00``)."""

    days: frozenset[int]
    start: int
    end: int
    tz: ZoneInfo
    label: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        days = ",".join(DAY_NAMES[d] for d in sorted(self.days))
        label = f"{days} {_hhmm(self.start)}-{_hhmm(self.end)} {self.tz.key}"
        object.__setattr__(self, "label", label)

    def __str__(self) -> str:
        return self.label

    def contains(self, now: float) -> bool:
        local = dt.datetime.fromtimestamp(now, self.tz)
        seconds = local.hour * 3600 + local.minute * 60 + local.second
        weekday = local.weekday()
        if self.start < self.end:
            return weekday in self.days and self.start <= seconds < self.end
        return (weekday in self.days and seconds >= self.start) or (
            (weekday - 1) % 7 in self.days and seconds < self.end
        )

    def next_change(self, now: float) -> float | None:
        """The first instant after ``now`` where :meth:`contains` differs, or None if never.

        Membership only changes when the wall clock reaches ``start`` or ``end`` (either fold
        of an ambiguous local time) or jumps at a UTC-offset transition, so those instants are
        the only candidates; the first one whose membership differs is exact.
        """
        state = self.contains(now)
        for instant in sorted(self._candidates(now)):
            if instant > now and self.contains(instant) != state:
                return instant
        return None

    def _candidates(self, now: float) -> set[float]:
        today = dt.datetime.fromtimestamp(now, self.tz).date()
        out: set[float] = set()
        for offset in range(-1, _HORIZON_DAYS + 1):
            midnight = dt.datetime.combine(today + dt.timedelta(days=offset), dt.time())
            for seconds in (self.start, self.end):
                wall = midnight + dt.timedelta(seconds=seconds)
                for fold in (0, 1):
                    out.add(wall.replace(tzinfo=self.tz, fold=fold).timestamp())
        out.update(_transitions(self.tz, now - _DAY, now + (_HORIZON_DAYS + 1) * _DAY))
        return out


def _hhmm(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"


def _offset(tz: ZoneInfo, instant: float) -> dt.timedelta | None:
    return dt.datetime.fromtimestamp(instant, tz).utcoffset()


def _transitions(tz: ZoneInfo, first: float, last: float) -> list[float]:
    """UTC-offset changes in [first, last], found day by day and bisected to the second."""
    out: list[float] = []
    start = float(int(first))
    while start < last:
        end = start + _DAY
        before = _offset(tz, start)
        if before != _offset(tz, end):
            low, high = start, end  # offset(low) == before != offset(high)
            while high - low > 1:
                middle = float(int((low + high) / 2))
                if _offset(tz, middle) == before:
                    low = middle
                else:
                    high = middle
            out.append(high)
        start = end
    return out


def parse_clock(text: str) -> int:
    """``HH:MM`` (``24:00`` allowed) to seconds after midnight; ValueError otherwise."""
    hours, sep, minutes = text.partition(":")
    if not (sep and hours.isdigit() and minutes.isdigit() and len(minutes) == 2):
        raise ValueError(f"time {text!r} must look like HH:MM")
    value = int(hours) * 3600 + int(minutes) * 60
    if int(minutes) > 59 or value > _DAY:
        raise ValueError(f"time {text!r} is not between 00:00 and 24:00")
    return value
