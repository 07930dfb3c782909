"""Decide what is garbage: a pure function of the engine's state (:mod:`dao.clean.scan`) and the options.

:func:`decide` returns a :class:`~dao.clean.plan.Plan` in removal order: containers first, so what only they
used (their image, anonymous volumes, networks) is garbage in the same plan, as after a ``docker container
prune``; then images (children before parents), orphan layers, volumes, networks, build cache.
"""

from __future__ import annotations

import re
from typing import Any

from dao.clean.dataroot import DataRoot
from dao.clean.facts import container_name, digests, engine_time, finished_at, tags, volume_evidence
from dao.clean.plan import KINDS, Item, Options, Plan, PlanError, Spared
from dao.clean.policy import Policy
from dao.clean.scan import State
from dao.units import format_age

_HEX64 = re.compile(r"[0-9a-f]{64}")
ANONYMOUS_LABEL = "com.docker.volume.anonymous"  # set by the engine (23.0 and later) on the volumes it makes
_PREDEFINED_NETWORKS = {"bridge", "host", "none", "ingress", "docker_gwbridge"}


class _Decider:
    def __init__(self, state: State, options: Options, now: float) -> None:
        self.state = state
        self.options = options
        self.now = now
        self.kinds = {kind for name in options.kinds for kind in KINDS[name]}
        self.policy = Policy(options, now, state.pulling)
        self.plan = Plan(state.host, options, notes=list(state.notes), created=now)
        self.book = state.book
        self.by_id = self.book.by_id
        self.chains = self.book.chains
        self.children: dict[str, set[str]] = {}
        for image in state.images:
            if image.get("ParentId"):
                self.children.setdefault(image["ParentId"], set()).add(image["Id"])
        self.df_sizes = {c["Id"]: int(c.get("SizeRw") or 0) for c in state.df.get("Containers") or []}
        self.users: dict[str, list[str]] = {}  # image id -> names of the containers that stay and use it
        self.planned: list[str] = []  # images to remove, in order
        self.planned_set: set[str] = set()
        self.ran: dict[str, float] = {}  # image id -> when a container of it last finished (or was created)
        for c in state.containers:
            if (t := finished_at(c)) is not None:
                self.ran[str(c.get("Image"))] = max(self.ran.get(str(c.get("Image")), 0.0), t)
        self._broken: dict[str, list[str]] = {}

    def spare(self, kind: str, id_: str, name: str, rule: str) -> None:
        self.plan.spared.append(Spared(kind, id_, name, rule))

    def add(self, item: Item) -> None:
        self.plan.items.append(item)

    # -- containers --------------------------------------------------------------------------------------------

    def containers(self) -> set[str]:
        removed: set[str] = set()
        if "container" not in self.kinds:
            return removed
        for c in sorted(self.state.containers, key=lambda c: finished_at(c) or 0):
            state = c.get("State") or {}
            status = str(state.get("Status", ""))
            if status not in ("exited", "dead", "created"):
                continue
            if status == "created":
                reason = "created, never started"
            elif status == "dead":
                reason = "dead"
            else:
                reason = f"exited ({state.get('ExitCode', '?')})"
            finished = finished_at(c)
            labels = (c.get("Config") or {}).get("Labels") or {}
            rule = self.policy.spare(
                labels=labels, last_used=finished, grace=max(self.options.grace, self.options.until)
            )
            restart = ((c.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name")
            if rule is None and restart == "always":
                rule = "restart policy always: the engine starts it again on its next start"
            if rule:
                self.spare("container", c["Id"], container_name(c), rule)
                continue
            removed.add(c["Id"])
            self.add(
                Item(
                    "container",
                    c["Id"],
                    container_name(c),
                    reason,
                    size=self.df_sizes.get(c["Id"], 0),
                    last_used=finished,
                    data={"finished": state.get("FinishedAt")},
                )
            )
        return removed

    # -- images ------------------------------------------------------------------------------------------------

    def image_last_used(self, image_id: str) -> float | None:
        doc = self.state.inspected.get(image_id) or {}
        times = [engine_time((doc.get("Metadata") or {}).get("LastTagTime")), self.ran.get(image_id)]
        known = [t for t in times if t]
        if known:
            return max(known)
        return engine_time(doc.get("Created")) or engine_time(self.by_id[image_id].get("Created"))

    def images(self, kept_containers: list[dict[str, Any]]) -> None:
        for c in kept_containers:
            self.users.setdefault(str(c.get("Image")), []).append(container_name(c))
        if "broken-image" in self.kinds:
            for image_id in sorted(self.by_id, key=lambda i: self.image_last_used(i) or 0):
                evidence = self.broken(image_id)
                if evidence and self.childless(image_id):
                    only_parent = all(line.startswith("parent image") for line in evidence)
                    what = "its parent image is gone" if only_parent else "its layer data is gone"
                    self.consider(image_id, "broken-image", f"broken: {what}", evidence)
                elif evidence:
                    self.spare("broken-image", image_id, "", "has child images; remove them first")

        if "image" in self.kinds:
            # dangling: no tag (a digest reference may remain: a re-pulled tag's old image), no child image;
            # then the untagged parents they leave behind. As docker's dangling=true.
            untagged = [i for i in self.by_id if not tags(self.by_id[i])]
            for image_id in sorted(untagged, key=lambda i: self.image_last_used(i) or 0):
                if image_id not in self.planned_set and not self.children.get(image_id) and not self.broken(image_id):
                    self.consider(image_id, "image", "dangling: untagged, no container uses it")
            self.untagged_parents(untagged)
            if self.options.images_unused:
                self.unused_images()
                self.untagged_parents(untagged)  # build steps behind the unused images
        sizes = self.book.freed_bytes(self.planned)
        for item in self.plan.items:
            if item.kind in ("image", "broken-image"):
                item.size = sizes.get(item.id, 0)
                item.data["after"] = sorted(self.children.get(item.id, set()) & self.planned_set)

    def untagged_parents(self, untagged: list[str]) -> None:
        """Untagged images whose every child goes: the build steps a removed image leaves behind (what
        ``docker rmi`` removes with it unless told ``--no-prune``)."""
        grew = True
        while grew:
            grew = False
            for image_id in untagged:
                child_images = self.children.get(image_id)
                if image_id in self.planned_set or not child_images or not self.childless(image_id):
                    continue
                if image_id in self.users or self.broken(image_id):
                    continue
                child = sorted(child_images)[0][7:19]
                grew |= self.consider(image_id, "image", f"untagged parent of {child}, which goes too")

    def childless(self, image_id: str) -> bool:
        """No child image stays: the engine refuses to remove a parent before its children."""
        return self.children.get(image_id, set()) <= self.planned_set

    def consider(self, image_id: str, kind: str, reason: str, evidence: list[str] | None = None) -> bool:
        """Plan the image unless a container or a safety rule keeps it; True when planned."""
        entry = self.by_id[image_id]
        name = ", ".join(tags(entry) or digests(entry)) or "<none>"
        last = self.image_last_used(image_id)
        if image_id in self.users:
            rule: str | None = f"used by container {', '.join(sorted(self.users[image_id]))}"
        else:
            rule = self.policy.spare(
                labels=entry.get("Labels") or {}, last_used=last, refs=tags(entry) + digests(entry)
            )
        if rule:
            self.spare(kind, image_id, name, rule)
            return False
        self.planned.append(image_id)
        self.planned_set.add(image_id)
        self.add(Item(kind, image_id, name, reason, last_used=last, evidence=evidence or []))
        return True

    def unused_images(self) -> None:
        """Tagged images no container uses, least recently used first, until --keep-free is met."""
        target = self.options.keep_free
        if target is not None and self.state.free is None:
            raise PlanError("--keep-free needs the engine's data root on this machine, to measure free space")
        candidates = [
            i
            for i in self.by_id
            if i not in self.planned_set and i not in self.users and tags(self.by_id[i]) and not self.broken(i)
        ]
        if self.policy.pull_in_progress:  # the pull may be of one of these: it is not garbage yet
            for image_id in candidates:
                name = ", ".join(tags(self.by_id[image_id]) or digests(self.by_id[image_id]))
                self.spare("image", image_id, name, f"a pull is in progress ({self.policy.pull_in_progress})")
            return
        for image_id in sorted(candidates, key=lambda i: self.image_last_used(i) or 0):
            if target is not None:
                others = sum(i.size + i.hidden for i in self.plan.items if i.kind not in ("image", "broken-image"))
                if (self.state.free or 0) + others + sum(self.book.freed_bytes(self.planned).values()) >= target:
                    self.plan.notes.append("--keep-free is met: the other unused images stay")
                    break
            if self.childless(image_id):
                last = self.image_last_used(image_id)
                self.consider(
                    image_id, "image", f"unused, last used {format_age(self.now - last) if last else '?'} ago"
                )

    def broken(self, image_id: str) -> list[str]:
        """Evidence that an image cannot be used: the engine cannot inspect it, its layers' files are gone,
        or its parent image is."""
        if image_id not in self._broken:
            self._broken[image_id] = self._evidence(image_id)
        return self._broken[image_id]

    def _evidence(self, image_id: str) -> list[str]:
        evidence = []
        if image_id in self.state.uninspectable:
            evidence.append(f"inspect fails: {self.state.uninspectable[image_id]}")
        root = self.state.dataroot
        if root is not None:
            for chain in self.chains[image_id]:
                layer = root.layers.get(chain)
                if layer is None:
                    evidence.append(f"layer {chain[:19]} is missing from the layer DB")
                elif layer.missing():
                    evidence.append(f"layer {chain[:19]}: {layer.files} is gone")
        parent = self.by_id[image_id].get("ParentId")
        if parent and parent not in self.by_id:
            evidence.append(f"parent image {parent[:19]} is gone")
        return evidence

    # -- orphan layers -----------------------------------------------------------------------------------------

    def layers(self) -> None:
        root = self.state.dataroot
        if root is None or "layer" not in self.kinds:
            return
        held: set[str] = {chain for chains in self.chains.values() for chain in chains}
        held |= root.mount_parents() | root.buildkit_chains()
        for chain in list(held):  # a held layer holds its parents
            layer = root.layers.get(chain)
            while layer is not None and layer.parent and layer.parent not in held:
                held.add(layer.parent)
                layer = root.layers.get(layer.parent)
        orphans = {c: layer for c, layer in root.layers.items() if c not in held}
        parents = {layer.parent for layer in root.layers.values() if layer.parent}
        counted: set[str] = set()
        for top in sorted(c for c in orphans if c not in parents):
            group, diffs, chain = [], [], top
            while chain:
                layer = root.layers.get(chain)
                if layer is None:
                    break
                diffs.append(layer.diff)
                if chain in orphans and chain not in counted:
                    group.append(layer)
                    counted.add(chain)
                chain = layer.parent or ""
            if len(diffs) != len(self._walk(root, top)):
                continue  # a parent is missing from the layer DB: the engine never loaded this chain
            last = max(layer.mtime for layer in group) if group else None
            name = f"{len(group)} layer{'s' * (len(group) != 1)} no image references"
            rule = self.policy.pull_in_progress and f"a pull is in progress ({self.policy.pull_in_progress})"
            rule = rule or self.policy.spare(last_used=last)
            if rule:
                self.spare("layer", top, name, rule)
                continue
            self.add(
                Item(
                    "layer",
                    top,
                    name,
                    "left by an interrupted pull or load",
                    hidden=sum(layer.size for layer in group),
                    last_used=last,
                    evidence=[f"{layer.chain[:19]}: {layer.size} B in {layer.files}" for layer in group],
                    data={"diff_ids": diffs[::-1], "chains": [layer.chain for layer in group]},
                )
            )

    @staticmethod
    def _walk(root: DataRoot, top: str) -> list[str]:
        chain, seen = top, []
        while chain and chain not in seen:
            seen.append(chain)
            layer = root.layers.get(chain)
            chain = (layer.parent or "") if layer else ""
        return seen

    # -- volumes, networks, build cache ------------------------------------------------------------------------

    def volumes(self, kept: list[dict[str, Any]], removed: list[dict[str, Any]]) -> None:
        if "volume" not in self.kinds:
            return
        used = {m.get("Name") for c in kept for m in c.get("Mounts") or [] if m.get("Type") == "volume"}
        finished: dict[str, float] = {}
        for c in removed:
            for m in c.get("Mounts") or []:
                if m.get("Type") == "volume" and (t := finished_at(c)):
                    finished[m["Name"]] = max(finished.get(m["Name"], 0), t)
        named, declared = volume_evidence(self.state.containers)
        for v in sorted(self.state.volumes, key=lambda v: str(v.get("Name"))):
            name = str(v.get("Name"))
            labels = v.get("Labels") or {}
            anonymous = ANONYMOUS_LABEL in labels or (name in declared and name not in named)
            if name in used:
                continue
            if not anonymous and not self.options.volumes_named:
                if _HEX64.fullmatch(name) and not labels:
                    # A random-looking name is no proof: engines before 23.0 label no volume anonymous, and
                    # `docker volume create <64 hex>` is a named volume.
                    self.spare("volume", name, name[:12], "no anonymous label or container says it is anonymous")
                continue
            last = max(filter(None, [engine_time(v.get("CreatedAt")), finished.get(name)]), default=None)
            rule = self.policy.spare(labels=labels, last_used=last)
            if rule:
                self.spare("volume", name, name, rule)
                continue
            size = int((v.get("UsageData") or {}).get("Size", 0))
            reason = f"{'anonymous' if anonymous else 'named'}, no container uses it"
            self.add(Item("volume", name, name[:12] if anonymous else name, reason, max(size, 0), last_used=last))

    def networks(self, kept: list[dict[str, Any]]) -> None:
        if "network" not in self.kinds:
            return
        used: set[str] = set()
        for c in kept:
            nets = ((c.get("NetworkSettings") or {}).get("Networks")) or {}
            used.update(nets)
            used.update(str(n.get("NetworkID")) for n in nets.values() if n and n.get("NetworkID"))
            used.add(str((c.get("HostConfig") or {}).get("NetworkMode")))
        for n in self.state.networks:
            name, id_ = str(n.get("Name")), str(n.get("Id"))
            if name in _PREDEFINED_NETWORKS or n.get("Scope") == "swarm" or n.get("Driver") in ("host", "null"):
                continue
            if name in used or id_ in used or n.get("Containers"):
                continue
            last = engine_time(n.get("Created"))
            rule = self.policy.spare(labels=n.get("Labels") or {}, last_used=last)
            if rule:
                self.spare("network", id_, name, rule)
                continue
            self.add(Item("network", id_, name, "no container uses it", last_used=last))

    def build_cache(self) -> None:
        if "build-cache" not in self.kinds:
            return
        records = {str(r["ID"]): r for r in self.state.df.get("BuildCache") or []}

        def depth(record: dict[str, Any]) -> int:
            n, parent = 0, record.get("Parent")
            while parent in records and n < 1000:
                n, parent = n + 1, records[parent].get("Parent")
            return n

        planned: set[str] = set()
        for r in sorted(records.values(), key=lambda r: (-depth(r), str(r["ID"]))):
            if r.get("InUse") or r.get("Shared"):
                continue  # in use by a build, or its bytes are an image's: removing it frees nothing
            last = engine_time(r.get("LastUsedAt")) or engine_time(r.get("CreatedAt"))
            rule = self.policy.spare(last_used=last)
            if rule:
                self.spare("build-cache", str(r["ID"]), str(r.get("Type")), rule)
                continue
            desc = str(r.get("Description") or r.get("Type") or "")
            self.add(
                Item(
                    "build-cache",
                    str(r["ID"]),
                    desc[:60],
                    f"build cache ({r.get('Type')})",
                    int(r.get("Size") or 0),
                    last_used=last,
                    data={"after": sorted(i for i in planned if records[i].get("Parent") == r["ID"])},
                )
            )
            planned.add(str(r["ID"]))


def decide(state: State, options: Options, now: float) -> Plan:
    """The plan for this state: pure, so the same state and options always give the same plan."""
    d = _Decider(state, options, now)
    removed = d.containers()
    kept = [c for c in state.containers if c["Id"] not in removed]
    gone = [c for c in state.containers if c["Id"] in removed]
    d.images(kept)
    d.layers()
    d.volumes(kept, gone)
    d.networks(kept)
    d.build_cache()
    return d.plan
