"""The safety rules: what ``dao clean`` never removes, whatever kind of garbage it looks like.

Being in use is decided by the scan (it knows which containers stay); these are the rules on top of it: the keep
label, ``--keep`` image patterns, the grace period, restart policy ``always``, a pull in progress. Each rule
answers with the words a person sees in the plan's "spared" list.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from dao.clean.plan import Options
from dao.oci.reference import DOCKER_HUB_NAMES
from dao.units import format_age


class Policy:
    def __init__(self, options: Options, now: float, pull_in_progress: str | None = None) -> None:
        self.options = options
        self.now = now
        self.pull_in_progress = pull_in_progress
        self._key, self._value = options.label()

    def spare(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        last_used: float | None = None,
        refs: Iterable[str] = (),
        grace: float | None = None,
    ) -> str | None:
        """Why this must stay, or None when nothing keeps it. ``grace`` overrides the global grace period."""
        if labels and labels.get(self._key) == self._value:
            return f"labelled {self.options.keep_label}"
        for ref in refs:
            for pattern in self.options.keep:
                if any(fnmatch.fnmatchcase(name, pattern) for name in ref_names(ref)):
                    return f"matches --keep {pattern}"
        limit = self.options.grace if grace is None else grace
        if last_used is not None and self.now - last_used < limit:
            return f"used {format_age(self.now - last_used)} ago, within {format_age(limit)}"
        return None


def ref_names(ref: str) -> set[str]:
    """The spellings a pattern may use for one reference: ``nginx:1``, ``library/nginx:1``,
    ``docker.io/library/nginx:1`` are one image."""
    names = {ref}
    name = ref
    for prefix in (f"{n}/" for n in DOCKER_HUB_NAMES):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    names.add(name)
    if name.startswith("library/"):
        name = name[len("library/") :]
        names.add(name)
    if "/" not in name.split(":")[0]:
        names.update({f"library/{name}", f"docker.io/library/{name}"})
    return names
