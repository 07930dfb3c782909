"""Which bytes of a blob a file holds: the byte runs written so far, in any order, and the gaps between them."""

from __future__ import annotations


class Runs:
    """Disjoint, sorted ``[start, end)`` byte runs written so far; adjacent runs merge."""

    def __init__(self, runs: list[tuple[int, int]] | None = None) -> None:
        self.runs: list[list[int]] = []
        for start, end in runs or []:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        runs = self.runs
        i = 0
        while i < len(runs) and runs[i][1] < start:
            i += 1
        j = i
        while j < len(runs) and runs[j][0] <= end:
            start, end = min(start, runs[j][0]), max(end, runs[j][1])
            j += 1
        runs[i:j] = [[start, end]]

    def end_of(self, pos: int) -> int:
        """Exclusive end of the run holding ``pos``; ``pos`` itself when that byte is not written."""
        for start, end in self.runs:
            if start <= pos < end:
                return end
            if start > pos:
                break
        return pos

    def holes(self, start: int, end: int) -> list[tuple[int, int]]:
        """The unwritten gaps of ``[start, end)``, in order."""
        out, pos = [], start
        for a, b in self.runs:
            if b <= pos:
                continue
            if a >= end:
                break
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
        if pos < end:
            out.append((pos, end))
        return out

    def covered(self) -> int:
        return sum(b - a for a, b in self.runs)
