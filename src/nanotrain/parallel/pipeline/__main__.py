"""Print a schedule's play-through: python -m nanotrain.parallel.pipeline zb_h1 4 8 (schedule, pp, m[, v])."""

import sys

from . import cached_timetable, chunks_per_rank, textbook_bubble
from .timeline import format_timetable

name, pp, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
v = chunks_per_rank(name, int(sys.argv[4]) if len(sys.argv) > 4 else (2 if name == "interleaved" else 1))
print(format_timetable(cached_timetable(name, pp, v, m)))
print(f"textbook bubble (backward = 2 x forward, B = W): {textbook_bubble(pp, m, v, name):.1%}")
