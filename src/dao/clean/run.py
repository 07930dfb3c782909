"""``dao clean`` end to end: connect, scan, decide, then print the plan (dry run) or apply it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dao.clean.decide import decide
from dao.clean.plan import Options, Plan, PlanError
from dao.clean.remove import Outcome, Result, apply, select
from dao.clean.scan import State, read_state
from dao.engine import Engine
from dao.units import format_age, format_size


@dataclass(frozen=True)
class Request:
    options: Options
    dry_run: bool = False
    plan_in: Path | None = None
    plan_out: Path | None = None
    as_json: bool = False
    verbose: bool = False


async def clean(request: Request, console: Console) -> int:
    """Exit status: 0 when everything planned was removed or skipped by a re-check, 1 when a removal failed."""
    wanted = Plan.read(request.plan_in) if request.plan_in else None
    options = wanted.options if wanted else request.options
    async with Engine() as engine:
        with console.status("reading the engine's state ...") if console.is_terminal else nullcontext():
            state, fresh = await scan(engine, options, made_for=wanted)
        if request.plan_out:
            fresh.write(request.plan_out)
        if request.dry_run:
            shown = fresh
            if wanted:
                todo, _ = select(wanted, fresh)
                shown = Plan(fresh.host, options, todo, fresh.spared, fresh.notes, fresh.created)
            _print_plan(shown, console, request)
            return 0
        report = (lambda o: None) if request.as_json else (lambda o: _print_outcome(o, console))
        result = await apply_plan(engine, wanted or fresh, state, fresh, report)
    _print_result(result, console, request)
    return 1 if result.failed else 0


async def scan(engine: Engine, options: Options, made_for: Plan | None = None) -> tuple[State, Plan]:
    """The engine's state and what is garbage in it now. ``made_for``: a plan to apply, which must be this
    engine's (a plan names the engine it was made on, so it is never applied to another)."""
    if made_for and made_for.host != engine.host:
        raise PlanError(f"the plan was made for the engine at {made_for.host}, not {engine.host}")
    info = await engine.negotiate()
    state = await read_state(engine, info, build_cache="build-cache" in options.kinds)
    return state, decide(state, options, time.time())


async def apply_plan(
    engine: Engine, wanted: Plan, state: State, fresh: Plan, report: Callable[[Outcome], None] = lambda o: None
) -> Result:
    """Remove what ``wanted`` lists and ``fresh`` (a scan made just now) still finds garbage; the rest is
    skipped, with the rule that now spares it. Nothing outside ``wanted`` is ever touched."""
    todo, skipped = select(wanted, fresh)
    for outcome in skipped:
        report(outcome)
    result = await apply(engine, todo, state, report)
    result.outcomes[:0] = skipped
    return result


def _print_plan(plan: Plan, console: Console, request: Request) -> None:
    if request.as_json:
        console.print_json(json.dumps(plan.to_json()))
        return
    now = time.time()
    if plan.items:
        table = Table(box=None, pad_edge=False)
        table.add_column("KIND")
        table.add_column("ID")
        table.add_column("NAME", max_width=32, overflow="fold")
        table.add_column("REASON", max_width=64, overflow="fold")  # evidence lines wrap; sizes stay in view
        table.add_column("SIZE", justify="right", no_wrap=True)
        table.add_column("LAST USED", no_wrap=True)
        for item in plan.items:
            size = format_size(item.size) if not item.hidden else f"{format_size(item.hidden)}*"
            last = f"{format_age(now - item.last_used)} ago" if item.last_used else "-"
            table.add_row(item.kind, _short(item.id), item.name, item.reason, size, last)
            for line in item.evidence:
                table.add_row("", "", "", f"  {line}", "", "")
        console.print(table)
    total = f"would free {format_size(plan.size)}"
    if plan.hidden:
        total += f" (+ {format_size(plan.hidden)}* on disk that docker system df does not count)"
    console.print(f"{len(plan.items)} items; {total}" if plan.items else "nothing to clean")
    _print_spared(plan, console, request.verbose)


def _print_spared(plan: Plan, console: Console, verbose: bool) -> None:
    if plan.spared and verbose:
        table = Table("KIND", "ID", "NAME", "SPARED BECAUSE", box=None, pad_edge=False, title="spared")
        for s in plan.spared:
            table.add_row(s.kind, _short(s.id), s.name, s.rule)
        console.print(table)
    elif plan.spared:
        console.print(f"{len(plan.spared)} more spared by the safety rules (-v lists them)")
    for note in plan.notes:
        console.print(f"note: {note}")


def _print_outcome(outcome: Outcome, console: Console) -> None:
    item = outcome.item
    what = f"{item.kind} {_short(item.id)} {item.name}".rstrip()
    if outcome.status == "removed":
        console.print(f"removed {what}")
    else:
        console.print(f"{outcome.status} {what}: {outcome.detail}")


def _print_result(result: Result, console: Console, request: Request) -> None:
    if request.as_json:
        console.print_json(json.dumps(result.to_json()))
        return
    removed = sum(1 for o in result.outcomes if o.status == "removed")
    line = f"removed {removed} items, freed {format_size(result.size)}"
    if result.hidden:
        line += f" (+ {format_size(result.hidden)} on disk that docker system df does not count)"
    console.print(line if removed or result.outcomes else "nothing to clean")


def _short(id_: str) -> str:
    return id_.removeprefix("sha256:")[:12] if len(id_) >= 32 else id_
