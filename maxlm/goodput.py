"""Where a run's wall time goes, across all its sessions (restarts): productive steps,
compilation, startup, data waiting, checkpointing, evaluation, writing a profile, and time lost
to restarts.

Goodput is productive step time over the run's whole wall time. Each session keeps one line of
`<run.dir>/goodput.jsonl` current (at logging steps, checkpoints and the end). A session that
resumes from step S reads the previous one's line: that session's step time after its save of S
was redone, and the gap between its last line and this session's start was downtime; both are
time lost to restarts, as is a restore-and-skip's redone work within a session.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from etils import epath

from maxlm import paths

# Measured buckets; "step" (productive) is the session's remainder.
MEASURED = ("compile", "startup", "data", "checkpoint", "eval", "profile", "lost")
BUCKETS = ("step", *MEASURED)
FILE = "goodput.jsonl"


class Goodput:
    """One session's time accounting, joined with the sessions before it in `goodput.jsonl`."""

    def __init__(
        self,
        run_dir: epath.Path,
        writes: bool,
        session_start: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`session_start`: when this process started (epoch seconds; default now)."""
        self._clock = clock
        self._path = run_dir / FILE
        self._writes = writes
        self.session_start = clock() if session_start is None else session_start
        self.seconds = dict.fromkeys(MEASURED, 0.0)
        self.start_step = 0
        self.step = 0
        self._step_s_at_save: dict[int, float] = {}
        self._before = _read(self._path) if self._path.exists() else []
        # what this session's restart cost the previous session: its redone steps, the downtime
        self._redone_before = 0.0
        self._gap_before = 0.0

    @contextmanager
    def timed(self, bucket: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self.seconds[bucket] += self._clock() - start

    def add(self, bucket: str, seconds: float) -> None:
        self.seconds[bucket] += seconds

    def started(self, step: int) -> None:
        """Training starts (or resumes) after step `step`: the previous session's step time
        since its save of `step`, and the downtime since its last line, were lost."""
        self.seconds["startup"] += self.step_seconds()  # all so far that is not compile
        self.start_step = self.step = step
        self._step_s_at_save = {step: 0.0}
        if not self._before:
            return
        previous = self._before[-1]
        if previous["start_step"] > step:  # it never saw `step`: all its work was redone
            redone = previous["step_s"]
        else:
            redone = previous["step_s"] - previous["step_s_at_save"].get(str(step), 0.0)
        self._redone_before = max(redone, 0.0)
        if not previous["finished"]:
            self._gap_before = max(self.session_start - previous["time"], 0.0)

    def stepped(self, step: int) -> None:
        self.step = step

    def saved(self, step: int) -> None:
        self._step_s_at_save[step] = self.step_seconds()

    def rewound(self, step: int) -> None:
        """Training went back to the checkpoint of `step`: the steps since were lost."""
        redone = self.step_seconds() - self._step_s_at_save.get(step, 0.0)
        self.seconds["lost"] += max(redone, 0.0)
        self.step = step

    def step_seconds(self) -> float:
        """This session's productive time so far: what the measured buckets leave."""
        return self._clock() - self.session_start - sum(self.seconds.values())

    def totals(self) -> dict[str, float]:
        """Seconds per bucket over the whole run so far, `wall_s`, and `goodput` (fraction)."""
        totals = dict.fromkeys(BUCKETS, 0.0)
        for session in [*self._before, self._line(finished=False)]:
            for bucket in BUCKETS:
                totals[bucket] += session["seconds"][bucket]
            totals["step"] -= session["redone_before"]
            totals["lost"] += session["redone_before"] + session["gap_before"]
        wall = sum(totals.values())
        return {
            **{f"{bucket}_s": value for bucket, value in totals.items()},
            "wall_s": wall,
            "goodput": totals["step"] / wall if wall > 0 else 0.0,
        }

    def _line(self, finished: bool) -> dict[str, Any]:
        step_s = self.step_seconds()
        return {
            "session_start": self.session_start,
            "time": self._clock(),
            "start_step": self.start_step,
            "step": self.step,
            "finished": finished,
            "step_s": step_s,
            "step_s_at_save": {str(k): v for k, v in self._step_s_at_save.items()},
            "seconds": {"step": step_s, **self.seconds},
            "redone_before": self._redone_before,
            "gap_before": self._gap_before,
        }

    def write_if_local(self) -> None:
        """A logging step's update of this session's line, where that is a local file write.
        In a bucket an upload per logging step would stall training, so the line is written at
        checkpoints only; the next session counts the time since as downtime, lost all the same."""
        if not paths.is_remote(self._path):
            self.write()

    def write(self, finished: bool = False) -> None:
        """Keep this session's line of goodput.jsonl current (process 0)."""
        if not self._writes:
            return
        lines = [json.dumps(session) + "\n" for session in [*self._before, self._line(finished)]]
        if paths.is_remote(self._path):  # an object is replaced whole: readers never see half
            self._path.write_text("".join(lines))
            return
        partial = self._path.with_suffix(".jsonl.partial")
        partial.write_text("".join(lines))
        os.replace(partial, self._path)


def summary_line(totals: dict[str, float]) -> str:
    """`goodput 91.2% of 1:02:03: steps 91.2%, compile 3.1%, ...` (buckets over 0.05%)."""
    wall = totals["wall_s"] or 1.0
    names = {"step": "steps", "lost": "lost to restarts", "data": "data waiting"}
    parts = [
        f"{names.get(bucket, bucket)} {100 * totals[f'{bucket}_s'] / wall:.1f}%"
        for bucket in BUCKETS
        if totals[f"{bucket}_s"] / wall >= 5e-4
    ]
    return f"goodput {100 * totals['goodput']:.1f}% of {totals['wall_s']:.1f} s: " + ", ".join(
        parts
    )


def _read(path: epath.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
