"""The figures every reliability suite reports: cases tried, failures, leaks found.

A suite opens one ``Case`` per thing it tries (a crash point, a storm, one
fuzzer example). A case that raises counts as a failure; leaks are reported
with ``Case.leaked`` and fail the case too. ``Figures`` adds them up per
suite for the terminal table and the JSON file written at the end of the
session (see ``conftest.pytest_terminal_summary``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Enough notes to see what went wrong without flooding the JSON file.
_MAX_NOTES = 25


@dataclass
class Suite:
    name: str
    cases: int = 0
    failures: int = 0
    leaks: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def note(self, text: str) -> None:
        if len(self.notes) < _MAX_NOTES:
            self.notes.append(text)

    def failed(self, text: str) -> None:
        """One failure found without raising (a suite that goes on to find them all)."""
        self.failures += 1
        self.note(text)

    @contextmanager
    def case(self, label: str) -> Iterator[Case]:
        """One case: counted when entered, a failure if it raises."""
        self.cases += 1
        started = time.monotonic()
        c = Case(self, label)
        try:
            yield c
        except BaseException as e:
            self.failures += 1
            self.note(f"{label}: {type(e).__name__}: {str(e)[:300]}")
            raise
        finally:
            self.seconds += time.monotonic() - started


@dataclass
class Case:
    suite: Suite
    label: str

    def leaked(self, found: list[str]) -> None:
        """Record leftovers (each one a leak) and fail the case if there are any."""
        if not found:
            return
        self.suite.leaks += len(found)
        raise AssertionError(f"{self.label}: {len(found)} leak(s): " + "; ".join(found))


class Figures:
    """All suites of the session, in the order they first reported."""

    def __init__(self) -> None:
        self.suites: dict[str, Suite] = {}

    def suite(self, name: str) -> Suite:
        return self.suites.setdefault(name, Suite(name))

    def table(self) -> list[str]:
        rows: list[tuple[str, ...]] = [("suite", "cases", "failures", "leaks", "seconds")]
        for s in self.suites.values():
            rows.append((s.name, str(s.cases), str(s.failures), str(s.leaks), f"{s.seconds:.1f}"))
        total = [sum(getattr(s, k) for s in self.suites.values()) for k in ("cases", "failures",
                                                                             "leaks")]
        secs = sum(s.seconds for s in self.suites.values())
        rows.append(("total", *map(str, total), f"{secs:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for n, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths, strict=True))))
            if n == 0 or n == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        for s in self.suites.values():
            if s.info:
                lines.append(f"{s.name}: " + ", ".join(f"{k}={v}" for k, v in s.info.items()))
        return lines

    def to_json(self, **extra: Any) -> str:
        return json.dumps(
            {
                **extra,
                "suites": {
                    s.name: {
                        "cases": s.cases,
                        "failures": s.failures,
                        "leaks": s.leaks,
                        "seconds": round(s.seconds, 2),
                        "notes": s.notes,
                        **({"info": s.info} if s.info else {}),
                    }
                    for s in self.suites.values()
                },
            },
            indent=2,
        )
