"""`tally`: the operator's command line (SPEC 6b)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sqlalchemy import func, select

from app.config import ConfigError, Settings, get_settings
from app.db import get_database
from app.queue import build_broker
from app.tasks import Jobs, declare_jobs, run_clock

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def migrate(settings: Settings) -> None:
    from alembic import command

    command.upgrade(alembic_config(settings.database_url), "head")


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from app.web import create_app

    if settings.is_sqlite:
        migrate(settings)  # the embedded default needs no separate release step
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    if settings.broker_kind == "inprocess":
        print(
            "tally worker: no broker configured (REDIS_URL or BROKER_URL); "
            "the embedded default runs its workers inside `tally serve`",
            file=sys.stderr,
        )
        return 2
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        "workers.process",
        "--processes",
        str(args.processes),
        "--threads",
        str(args.threads),
    ]
    os.execv(sys.executable, argv)
    return 0  # not reached


def jobs_for(settings: Settings) -> Jobs:
    """This process's doorbells and actors on the configured broker."""
    return declare_jobs(build_broker(settings), settings, get_database())


def cmd_clock(settings: Settings, args: argparse.Namespace) -> int:
    run_clock(jobs_for(settings), settings.reconcile_at)
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    migrate(settings)
    return 0


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> int:
    from app.keys import create_key

    scope = "service" if args.service else "customer"
    token = create_key(get_database(), scope=scope, customer_id=args.customer, label=args.label)
    print(token)
    print(
        f"(a {scope} token{' for ' + args.customer if args.customer else ''}; it is shown only this once)",
        file=sys.stderr,
    )
    return 0


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    from app.ledger.audit import audit

    with get_database().read() as session:
        report = audit(session)
    for notice in report.notices:
        print(f"notice: {notice}")
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"{len(report.problems)} problem(s) found", file=sys.stderr)
        return 1
    print("ledger verified: every balance matches its entries and every chain is unbroken")
    return 0


def cmd_events_list(settings: Settings, args: argparse.Namespace) -> int:
    from app.models import InboxEvent

    with get_database().read() as session:
        counts = dict(session.execute(select(InboxEvent.status, func.count()).group_by(InboxEvent.status)).all())
        query = select(InboxEvent).order_by(InboxEvent.id.desc()).limit(args.limit)
        if args.status:
            query = query.where(InboxEvent.status == args.status)
        events = session.execute(query).scalars().all()
    print("  ".join(f"{status}: {count}" for status, count in sorted(counts.items())) or "the inbox is empty")
    for event in events:
        error = f"  {event.last_error.splitlines()[0][:80]}" if event.last_error else ""
        print(
            f"{event.id:>8}  {event.provider:<6} {event.status:<9} attempts={event.attempts:<2} "
            f"{event.received_at:%Y-%m-%d %H:%M:%S}  {event.type}  {event.provider_event_id}{error}"
        )
    return 0


def cmd_events_show(settings: Settings, args: argparse.Namespace) -> int:
    from app.models import InboxEvent

    with get_database().read() as session:
        event = session.get(InboxEvent, args.id)
        if event is None:
            print(f"no inbox event {args.id}", file=sys.stderr)
            return 1
        print(
            json.dumps(
                {
                    "id": event.id,
                    "provider": event.provider,
                    "provider_event_id": event.provider_event_id,
                    "type": event.type,
                    "status": event.status,
                    "attempts": event.attempts,
                    "received_at": event.received_at.isoformat(),
                    "processed_at": event.processed_at.isoformat() if event.processed_at else None,
                    "last_error": event.last_error,
                    "body": json.loads(event.body),
                },
                indent=2,
            )
        )
    return 0


def cmd_events_replay(settings: Settings, args: argparse.Namespace) -> int:
    from app.inbox.store import replay

    ok = replay(get_database(), jobs_for(settings).enqueue_event, args.id)
    print(f"inbox event {args.id} {'re-enqueued' if ok else 'is not a failed event; nothing done'}")
    if ok and settings.broker_kind == "inprocess":
        print("(embedded default: the running `tally serve` sweeper applies it within a minute)")
    return 0 if ok else 1


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """`tally reconcile`: run it now (or show a stored run with --report); exit 1 when a run could not finish."""
    from app.reconciliation.cli import reconcile_command

    return reconcile_command(get_database(), settings, args)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="tally", description="Tally, a webhook-driven credit ledger")
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the web app (and, embedded, the workers)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(run=cmd_serve)

    worker = commands.add_parser("worker", help="run Dramatiq workers against the configured broker")
    worker.add_argument("--processes", type=int, default=2)
    worker.add_argument("--threads", type=int, default=8)
    worker.set_defaults(run=cmd_worker)

    commands.add_parser("clock", help="run the scheduler (sweeper, expiry)").set_defaults(run=cmd_clock)
    commands.add_parser("migrate", help="alembic upgrade head").set_defaults(run=cmd_migrate)
    commands.add_parser("verify", help="check the ledger's invariants").set_defaults(run=cmd_verify)

    reconcile = commands.add_parser("reconcile", help="compare with the providers and repair drift (SPEC 7)")
    reconcile.add_argument(
        "--provider", choices=["stripe", "dodo"], help="one provider (default: every configured one)"
    )
    reconcile.add_argument("--dry-run", action="store_true", help="change nothing; record what would be done")
    reconcile.add_argument("--since", metavar="DATE", help="undelivered events from this date (default: last run)")
    reconcile.add_argument("--json", action="store_true", help="print the stored run(s) as JSON")
    reconcile.add_argument("--report", nargs="?", const=0, type=int, metavar="RUN_ID", help="show a stored run")
    reconcile.set_defaults(run=cmd_reconcile)

    keys = commands.add_parser("keys", help="API tokens").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="print a new token once")
    scope = create.add_mutually_exclusive_group(required=True)
    scope.add_argument("--service", action="store_true", help="may read and write every customer")
    scope.add_argument("--customer", metavar="CUSTOMER_ID", help="may read only this customer")
    create.add_argument("--label")
    create.set_defaults(run=cmd_keys_create)

    events = commands.add_parser("events", help="the inbox and its dead letters")
    events_commands = events.add_subparsers(dest="events_command", required=True)
    listing = events_commands.add_parser("list")
    listing.add_argument("--status", choices=["pending", "processed", "skipped", "failed"])
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=cmd_events_list)
    show = events_commands.add_parser("show")
    show.add_argument("id", type=int)
    show.set_defaults(run=cmd_events_show)
    replay = events_commands.add_parser("replay", help="re-apply a failed event once its cause is fixed")
    replay.add_argument("id", type=int)
    replay.set_defaults(run=cmd_events_replay)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = get_settings()
    except ConfigError as error:
        for problem in error.problems:
            print(f"tally: configuration error: {problem}", file=sys.stderr)
        return 2
    return int(args.run(settings, args))


if __name__ == "__main__":
    sys.exit(main())
