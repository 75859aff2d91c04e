"""The `tally reconcile` command's work: run, then print a short summary (or the stored runs as JSON).

Kept here, beside the domain it prints, so `app/cli.py` only declares the arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from app.config import Settings
from app.db import Database
from app.errors import InvalidInput
from app.reconciliation.runs import get_run, latest_run_ids
from app.reconciliation.service import PROVIDERS, reconcile
from app.times import InvalidInstant, parse_instant


def summary(run: dict[str, Any]) -> list[str]:
    """Counts first, then one line per drift."""
    counts = run["counts"]
    head = (
        f"run {run['id']} {run['provider']}{' (dry run)' if run['dry_run'] else ''}: {run['status']}; "
        f"checked {counts['checked']}, matched {counts['matched']}, repaired {counts['repaired']}, "
        f"drifted {counts['drifted']}, errors {counts['errors']}; api calls {run['api_calls']}"
    )
    lines = [head]
    if run["error"]:
        lines.append(f"  error: {run['error']}")
    for drift in run["drifts"]:
        lines.append(
            f"  {drift['object_type']} {drift['object_id']} {drift['field']}: "
            f"tally={drift['tally_value']} provider={drift['provider_value']} -> {drift['action']}"
        )
    return lines


class Progress:
    """One line, rewritten in place, when stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.active = stream.isatty()

    def __call__(self, line: str) -> None:
        if self.active:
            self.stream.write("\r\x1b[K" + line[:150])
            self.stream.flush()

    def done(self) -> None:
        if self.active:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _print(db: Database, run_ids: list[int], as_json: bool) -> list[dict[str, Any]]:
    with db.read() as session:
        runs = [run for run_id in run_ids if (run := get_run(session, run_id)) is not None]
    if as_json:
        print(json.dumps(runs[0] if len(runs) == 1 else runs, indent=2))
    else:
        for run in runs:
            print("\n".join(summary(run)))
    return runs


def reconcile_command(db: Database, settings: Settings, args: argparse.Namespace) -> int:
    if args.report is not None:
        with db.read() as session:
            ids = [args.report] if args.report else latest_run_ids(session)
        runs = _print(db, ids, args.json)
        if not runs:
            print("no such reconciliation run" if args.report else "no reconciliation has run yet", file=sys.stderr)
            return 1
        return 0
    since = None
    if args.since:
        try:
            since = parse_instant(args.since)
        except (InvalidInstant, InvalidInput) as error:
            print(f"tally reconcile: --since {error}", file=sys.stderr)
            return 2
    progress = Progress(sys.stderr)
    outcome = reconcile(
        db,
        settings,
        providers=[args.provider] if args.provider else PROVIDERS,
        dry_run=args.dry_run,
        since=since,
        progress=progress,
    )
    progress.done()
    for note in outcome.notes:
        print(note, file=sys.stderr if args.json else sys.stdout)
    _print(db, outcome.run_ids, args.json)
    if not outcome.run_ids:
        return 1  # nothing could run: no provider has an API key
    return 1 if outcome.failed else 0
