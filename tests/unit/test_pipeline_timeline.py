"""Pipeline timeline: alignment across ranks, measured bubble, the PNG."""

from __future__ import annotations

import pytest

from nanotrain.parallel.pipeline import cached_timetable, textbook_bubble
from nanotrain.parallel.pipeline.timeline import (
    RankTimeline,
    align,
    format_bubble,
    measured_bubble,
    plot_timeline,
    timetable_timelines,
)
from pictures import assert_picture


def _two_ranks(t0_rank1: float = 100.0) -> list[RankTimeline]:
    # Absolute times (t0_wall = 100): rank 0 computes [0, 1) and [3, 5); rank 1 waits
    # [0, 1), computes [1, 3) and posts a message [3, 4). Span 5 s, busy 3 and 2 s:
    # bubble = 1 - 2.5 / 5 = 0.5 (rank 1's wait and comm count as bubble).
    shift = 100.0 - t0_rank1  # rank 1's events relative to its own t0_wall
    return [
        RankTimeline(0, 100.0, [("F", 0, 0, 0.0, 1.0), ("B", 0, 0, 3.0, 5.0)]),
        RankTimeline(1, t0_rank1, [("wait", 0, 0, 0.0 + shift, 1.0 + shift), ("F", 0, 0, 1.0 + shift, 2.0 + shift),
                                   ("B", 0, 0, 2.0 + shift, 3.0 + shift), ("comm", -1, -1, 3.0 + shift, 4.0 + shift)]),
    ]


def test_measured_bubble_exact():
    assert measured_bubble(_two_ranks()) == pytest.approx(0.5)


def test_align_uses_wall_clock():
    # Rank 1 started its clock 0.25 s later: same absolute events, same picture and bubble.
    same, shifted = _two_ranks(100.0), _two_ranks(100.25)
    assert shifted[1].events[0][3] == pytest.approx(-0.25)
    for a, b in zip(align(same), align(shifted)):
        for ea, eb in zip(a, b):
            assert ea[:3] == eb[:3] and ea[3:] == pytest.approx(eb[3:])
    assert measured_bubble(shifted) == pytest.approx(measured_bubble(same))
    assert align(same)[0][0][3] == 0.0  # times start at the earliest event


def test_timetable_timelines_match_textbook():
    tt = cached_timetable("1f1b", 4, 1, 8)
    assert measured_bubble(timetable_timelines(tt)) == pytest.approx(textbook_bubble(4, 8))
    # Unit costs reproduce the play-through's slots exactly.
    unit = timetable_timelines(tt, slot_ms=1.0, backward_cost=1.0)
    for r, tl in enumerate(unit):
        slots = [(a.kind, a.chunk, a.mb, t / 1e3, (t + 1) / 1e3) for t, a in enumerate(tt.slots[r]) if a is not None]
        assert [e[:3] for e in tl.events] == [s[:3] for s in slots]
        assert [x for e in tl.events for x in e[3:]] == pytest.approx([x for s in slots for x in s[3:]])
    assert measured_bubble(unit) == pytest.approx(tt.bubble())


def test_plot_timeline_png(tmp_path):
    tt = cached_timetable("interleaved", 2, 2, 4)
    tls = timetable_timelines(tt)
    tls[0].events.append(("wait", 0, 1, 0.0005, 0.001))  # grey bars are drawn too
    out = plot_timeline(tls, tmp_path / "sub" / "pp.png", title="interleaved",
                        textbook=textbook_bubble(2, 4, 2), measured=measured_bubble(tls))
    # Two ranks' rows of bars: wider than tall, and drawn in the phases' colours.
    pixels = assert_picture(out, min_size=(600, 150))
    assert pixels.shape[1] > 2 * pixels.shape[0]


def test_format_bubble():
    line = format_bubble(0.312, 0.2727)
    assert line.startswith("pipeline bubble: measured 31.2%, textbook 27.3%")
    assert format_bubble(0.5) == "pipeline bubble: measured 50.0%"
