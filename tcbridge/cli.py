"""The command line: parse, set up logging, call into the app, return an exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tcbridge import __version__, app, logs, retention
from tcbridge.backfill import backfill
from tcbridge.config import PollKind, Settings, load_settings, redact_dsn
from tcbridge.dispatch import explain_route
from tcbridge.errors import ApiError, ConfigError, InvalidEvent, StoreError, UnknownName
from tcbridge.store import StoreBackend, make_store
from tcbridge.store.transfer import migrate_store
from tcbridge.timefmt import instant_us, parse_instant

EXIT_USAGE = 2
DESCRIPTION = ("tcbridge: Tradecloud webhooks and polling into a durable store, delivered "
               "at least once to your ERP's handlers.")

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tcbridge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.func
    try:
        return command(args)
    except (ConfigError, UnknownName) as e:
        print(f"tcbridge: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as e:
        print(f"tcbridge: store: {e}", file=sys.stderr)
        return 1
    except ApiError as e:
        print(f"tcbridge: tradecloud: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the port is taken, a TLS file is missing
        print(f"tcbridge: cannot start: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options."""
    parser = argparse.ArgumentParser(prog="tcbridge", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"tcbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(sub, "run", "run the daemon in the foreground", cmd_run)
    run.add_argument("--log-format", choices=["auto", "json", "console"], default=None)
    _command(sub, "check-config", "validate the configuration and exit", cmd_check_config)
    events = _command(sub, "events", "list stored events, newest first", cmd_events)
    events.add_argument("--entity", help="only this order or shipment id")
    events.add_argument("--limit", type=int, default=50)
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    cursor = _command(sub, "cursor", "show or set the poll cursors", cmd_cursor)
    cursor.add_argument("--set", metavar="KIND=TIMESTAMP", action="append", default=[],
                        help="set a cursor, e.g. order=2024-01-01T00:00:00.000Z")
    deliveries = _command(sub, "deliveries", "list deliveries to handlers, newest first",
                          cmd_deliveries)
    deliveries.add_argument("--status", choices=["pending", "running", "done", "dead"])
    deliveries.add_argument("--handler", help="only this handler")
    deliveries.add_argument("--limit", type=int, default=50)
    deliveries.add_argument("--json", action="store_true", help="one JSON object per line")
    replay = _command(sub, "replay", "deliver events again", cmd_replay)
    what = replay.add_mutually_exclusive_group(required=True)
    what.add_argument("--event", metavar="ID", help="deliver this event again, even if done")
    what.add_argument("--dead", action="store_true", help="re-queue dead deliveries")
    replay.add_argument("--handler", help="only this handler")
    status = _command(sub, "status", "mode, cursors, last polls, counts and backlog", cmd_status)
    status.add_argument("--json", action="store_true", help="one JSON document")
    backfill = _command(sub, "backfill", "one-off catch-up from a timestamp (safe while the "
                        "daemon runs; the main cursor is not touched)", cmd_backfill)
    backfill.add_argument("--since", required=True, metavar="TIMESTAMP",
                          help="e.g. 2024-01-01T00:00:00.000Z")
    backfill.add_argument("--kinds", nargs="+", choices=["order", "shipment"],
                          help="default: the configured poll.kinds")
    _command(sub, "purge", "apply the retention policy now", cmd_purge)
    move = _command(sub, "migrate-store", "copy the SQLite store (store.path) into an empty "
                    "PostgreSQL store; stop the daemon first", cmd_migrate_store)
    target = move.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="DSN", help="postgresql://user@host:5432/database")
    target.add_argument("--to-file", metavar="PATH", type=Path,
                        help="a file holding the DSN (keeps a password off the command line)")
    _add_simulate(sub)
    return parser


def _command(
    sub: Any, name: str, help_text: str, func: Command, *, config: bool = True
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text,
                                                     description=help_text)
    if config:
        parser.add_argument("--config", "-c", type=Path, required=True,
                            help="the TOML configuration file")
    parser.set_defaults(func=func)
    return parser


def _add_simulate(sub: Any) -> None:
    from tcbridge import simulator

    parser = _command(sub, "simulate", "run the Tradecloud simulator (a local stand-in)",
                      cmd_simulate, config=False)
    simulator.add_arguments(parser)


def cmd_run(args: argparse.Namespace) -> int:
    """``tcbridge run``."""
    settings = load_settings(args.config)
    logs.configure(settings.log.level, args.log_format or settings.log.format,
                   repeat_burst=settings.log.repeat_burst,
                   repeat_interval_s=settings.log.repeat_interval_s)
    return app.run(settings)


def cmd_check_config(args: argparse.Namespace) -> int:
    """``tcbridge check-config``."""
    settings = load_settings(args.config)
    print(f"{args.config}: ok (mode {settings.mode}, {len(settings.handlers)} handler(s))")
    if settings.webhook_enabled and settings.webhook.auth == "none":
        print(f"{args.config}: warning: webhook.auth = 'none': anyone who can reach "
              f"{settings.webhook.host}:{settings.webhook.port} can post events", file=sys.stderr)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """``tcbridge events``: with the handlers each event was routed to and, in JSON, the
    handlers the current configuration's filters skip and why."""
    settings = _quiet_settings(args, read_only=True)

    async def read(store: StoreBackend) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await store.events(entity_id=args.entity, limit=args.limit)
        routing = await store.routing([row["seq"] for row in rows])
        return [row | _routing_fields(settings, *routing.get(row["seq"], ([], None)))
                for row in rows]

    rows = asyncio.run(_with_store(settings, read))
    if not args.json:
        rows = [row | {"routedTo": ",".join(row["routedTo"]) or "-"} for row in rows]
    _print_rows(rows, ["seq", "id", "kind", "entityId", "lastUpdatedAt", "eventName",
                       "source", "late", "duplicates", "routedTo"], as_json=args.json)
    return 0


def _routing_fields(
    settings: Settings, routed: list[str], envelope_text: str | None
) -> dict[str, Any]:
    """``routedTo`` (a list; the table shows it joined) and ``skipped`` (handler -> reason,
    from the current filters; null when the payload was purged)."""
    skipped: dict[str, str] | None = None
    if envelope_text is not None:
        envelope = json.loads(envelope_text)
        skipped = {name: reason for name, reason in
                   explain_route(settings.handlers, envelope).items() if name not in routed}
    return {"routedTo": routed, "skipped": skipped}


def cmd_cursor(args: argparse.Namespace) -> int:
    """``tcbridge cursor``."""
    settings = _quiet_settings(args, read_only=not args.set)
    updates = [_parse_assignment(text) for text in args.set]
    cursors = asyncio.run(_with_store(settings, lambda s: _cursor_op(s, updates)))
    for kind in sorted(set(cursors) | set(settings.poll.kinds)):
        value, updated = cursors.get(kind, (None, None))
        shown = value or f"(none; starts at {settings.poll.start_from})"
        print(f"{kind:<10} {shown}" + (f"  (set {updated})" if updated else ""))
    return 0


def cmd_deliveries(args: argparse.Namespace) -> int:
    """``tcbridge deliveries``."""
    settings = _quiet_settings(args, read_only=True)
    rows = asyncio.run(_with_store(settings, lambda s: _deliveries(s, args, settings)))
    _print_rows(rows, ["id", "eventId", "handler", "kind", "entityId", "eventName", "status",
                       "attempts", "lastError"], as_json=args.json)
    return 0


async def _deliveries(
    store: StoreBackend, args: argparse.Namespace, settings: Settings
) -> list[dict[str, Any]]:
    known = {h.name for h in settings.handlers} | set(await store.delivery_counts())
    if args.handler is not None and args.handler not in known:
        raise UnknownName(f"no handler named {args.handler!r} in {args.config} or the store"
                          f" (known: {', '.join(sorted(known)) or 'none'})")
    rows: list[dict[str, Any]] = await store.deliveries(
        status=args.status, handler=args.handler, limit=args.limit)
    return rows


def cmd_replay(args: argparse.Namespace) -> int:
    """``tcbridge replay``: new attempts of the same event ids, picked up by the daemon."""
    settings = _quiet_settings(args, read_only=True)
    names = {h.name for h in settings.handlers}
    if args.handler is not None and args.handler not in names:
        raise UnknownName(f"{args.config}: no handler named {args.handler!r}")
    handlers = None if args.handler is None else [args.handler]
    if args.dead:
        count = asyncio.run(_with_store(settings, lambda s: s.requeue_dead(args.handler)))
        print(f"re-queued {count} dead deliveries")
    else:
        count = asyncio.run(_with_store(settings, lambda s: s.replay(args.event, handlers)))
        print(f"queued {count} deliveries of event {args.event}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``tcbridge status``."""
    settings = _quiet_settings(args, read_only=True)
    report = asyncio.run(_with_store(settings, lambda s: _status(s, settings)))
    report = {"mode": settings.mode, **report}
    report["cursors"] = {
        kind: value | {"ageSeconds": _age_s(value["value"])}
        for kind, value in report["cursors"].items()
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(status_text(report))
    return 0


async def _status(store: StoreBackend, settings: Settings) -> dict[str, Any]:
    report = await store.status()
    if settings.store.backend == "postgresql":
        replicas = await store.replicas(settings.node.seen_within_s)
        report["replicas"] = replicas
        # kind -> the replica polling it (None: nobody seen recently holds its lock)
        report["pollers"] = {kind: next((r["id"] for r in replicas if kind in r["polls"]),
                                        None)
                             for kind in settings.poll.kinds}
    return report


def status_text(report: dict[str, Any]) -> str:
    """The readable form of ``tcbridge status``."""
    counts = report["counts"]
    lines = [f"mode        {report['mode']}", ""]
    lines.append("cursor      kind       value                          age")
    for kind, cursor in sorted(report["cursors"].items()):
        lines.append(f"            {kind:<10} {cursor['value']:<30} {_human(cursor['ageSeconds'])}")
    lines += ["", "last poll   kind       last success              items  stored  error"]
    for kind, poll in sorted(report["polls"].items()):
        lines.append(f"            {kind:<10} {poll['lastSuccessAt'] or '-':<25} "
                     f"{_dash(poll['lastItems']):>5}  {_dash(poll['lastStored']):>6}  "
                     f"{poll['lastError'] or ''}")
    duplicates = ", ".join(f"{k} {v}" for k, v in sorted(counts["duplicates"].items())) or "0"
    lines += ["", f"events      {counts['events']}  (recovered by the poller: "
              f"{counts['recovered']})",
              f"duplicates  {duplicates}", f"stale       {counts['stale']}",
              f"rejected    {counts['rejected']}", f"fetches     {counts['fetchPending']} pending, "
              f"{counts['fetchFailed']} failed",
              "", "deliveries  handler              pending  running  dead"]
    for handler, by_status in sorted(report["backlog"].items()):
        lines.append(f"            {handler:<20} {by_status.get('pending', 0):>7}  "
                     f"{by_status.get('running', 0):>7}  {by_status.get('dead', 0):>4}")
    if not report["backlog"]:
        lines.append("            (nothing pending, running or dead)")
    if "replicas" in report:
        lines += ["", "replicas    id                   last seen  polls"]
        lines += [f"            {r['id']:<20} {_human(r['lastSeenSecondsAgo']) + ' ago':>9}  "
                  f"{', '.join(r['polls']) or 'standby'}" for r in report["replicas"]]
        if not report["replicas"]:
            lines.append("            (none seen recently)")
        lines += [f"poller      {kind:<10} {who or '(nobody: no replica holds the lock)'}"
                  for kind, who in sorted(report["pollers"].items())]
    return "\n".join(lines)


def _age_s(value: str) -> float | None:
    try:
        return max(0.0, time.time() - instant_us(value) / 1_000_000)
    except InvalidEvent:
        return None


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def cmd_backfill(args: argparse.Namespace) -> int:
    """``tcbridge backfill``: the poller's paging and dedup from ``--since``, own cursor."""
    settings = _quiet_settings(args)
    _timestamp(args.since, "--since")
    kinds = args.kinds or settings.poll.kinds
    totals = asyncio.run(_backfill(settings, args.since, kinds))
    incomplete = []
    for kind, stats in totals.items():
        print(f"{kind}: {stats.items} fetched in {stats.pages} pages, {stats.stored} new, "
              f"{stats.duplicates} duplicates, {stats.stale} stale, {stats.rejected} rejected"
              + ("" if stats.complete else f"; INCOMPLETE, stopped at {stats.cursor}"))
        if not stats.complete:
            incomplete.append(kind)
    if incomplete:
        # The result set kept shifting under the pages: run it again (it resumes from its
        # own cursor, duplicates are harmless) rather than take this for a full catch-up.
        print(f"tcbridge: backfill incomplete for {', '.join(incomplete)}: run it again",
              file=sys.stderr)
        return 1
    return 0


async def _backfill(settings: Settings, since: str, kinds: list[PollKind]) -> dict[str, Any]:
    return await backfill(settings, since, kinds, progress_stream=sys.stderr)


def cmd_purge(args: argparse.Namespace) -> int:
    """``tcbridge purge``: what retention does, on demand."""
    settings = _quiet_settings(args, read_only=True)
    totals = asyncio.run(_with_store(settings, lambda s: retention.purge_all(
        s, retention.policy(settings.store))))
    print("purged: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    return 0


def cmd_migrate_store(args: argparse.Namespace) -> int:
    """``tcbridge migrate-store``: SQLite to PostgreSQL, counts verified per table."""
    settings = _quiet_settings(args)
    if settings.store.backend != "sqlite":
        raise ConfigError(f"{args.config}: store.backend is {settings.store.backend!r}; "
                          "migrate-store copies the SQLite store of a configuration")
    dsn = args.to if args.to is not None else args.to_file.read_text().strip()
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"--to: expected postgresql://user@host:5432/database, got "
                          f"{redact_dsn(dsn)!r}")
    copies = asyncio.run(migrate_store(settings.store.path, dsn, settings.store))
    _table([{"table": c.table, "sqlite": c.source_rows, "postgresql": c.target_rows}
            for c in copies], ["table", "sqlite", "postgresql"])
    print(f"\ncopied {settings.store.path} into {redact_dsn(dsn)}: every count matches.")
    print(f"Now set in {args.config}, [store] (and keep {settings.store.path} as a backup):")
    print('  backend = "postgresql"')
    print('  dsn_file = "/etc/tcbridge/pg-dsn"   # a file holding the DSN; or dsn = "..."')
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """``tcbridge simulate``."""
    from tcbridge import simulator

    logs.configure("info", "auto")
    return asyncio.run(_simulate(args, simulator.run_from_args))


async def _simulate(args: argparse.Namespace, run: Any) -> int:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    result: int = await run(args, stop)
    return result


async def _cursor_op(
    store: StoreBackend, updates: list[tuple[str, str]]
) -> dict[str, tuple[str, str]]:
    for kind, value in updates:
        await store.set_cursor(kind, value)
    return await store.cursors()


def _parse_assignment(text: str) -> tuple[str, str]:
    kind, sep, value = text.partition("=")
    if not sep or kind not in ("order", "shipment"):
        raise ConfigError(f"--set {text!r}: expected order=TIMESTAMP or shipment=TIMESTAMP")
    return kind, _timestamp(value, f"--set {text!r}")


def _timestamp(value: str, where: str) -> str:
    """A timestamp argument, refused with exit 2 when it is not one."""
    try:
        parse_instant(value)
    except InvalidEvent as e:
        raise ConfigError(f"{where}: {e}") from e
    return value


def _quiet_settings(args: argparse.Namespace, *, read_only: bool = False) -> Settings:
    """The settings, with logging to stderr; ``read_only``: the store must exist already
    (a wrong --config or store.path must not show a new, empty store as if it were real)."""
    settings = load_settings(args.config)
    logs.configure("warning", "console", stream=sys.stderr)
    if read_only and settings.store.backend == "sqlite" and not settings.store.path.exists():
        raise ConfigError(f"{args.config}: no store at {settings.store.path} (store.path);"
                          " is this the daemon's configuration?")
    return settings


async def _with_store(settings: Settings, op: Callable[[StoreBackend], Any]) -> Any:
    async with make_store(settings.store) as store:
        return await op(store)


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Control characters as \\xNN: ids, names and errors come from payloads and handlers,
    and an escape sequence must not reach the operator's terminal."""
    return _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _print_rows(rows: list[dict[str, Any]], columns: list[str], *, as_json: bool) -> None:
    """One JSON object per line, or a table of the given columns."""
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        _table(rows, columns)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("" if row[c] is None else _printable(str(row[c]))) for c in columns]
             for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
