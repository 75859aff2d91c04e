"""`make bench`: every figure of the throughput issue in one run, with its baseline, ratio and floor.

    make bench                                   # the whole run, ~5-6 minutes
    make bench BENCH_ARGS="--quick --only P1,P3"  # or .venv/bin/python bench/run.py --quick --only P1,P3
    options: --only P1,P2,P2b,P3,P4,P5  --quick  --no-embedded  --embedded-only  --strict  --keep  --profile

What runs (the production shape first, as an operator would run it on this 2-core machine):

- a scratch PostgreSQL database on 127.0.0.1:5432 (created, `tally migrate`d, dropped at the end) and a
  private `redis-server` on a free port (no persistence); one web process, `uvicorn
  bench.server:create_app --factory` (Tally's `app.web:create_app` plus `/bare` GET/POST routes, one
  process, uvloop/httptools, no access log, the app's default pool of 20); one `tally worker
  --processes 1 --threads 8`; a service token from `tally keys create --service` (stored hashed in
  the database, as an operator's CLI-made token is; TALLY_API_KEYS is not set); a plan catalogue
  (TALLY_PLANS) written by the bench (bench/workload.py). Customers and balances are made as an
  operator's would be: one signed Stripe `customer.subscription.created` webhook per customer whose
  price is in the catalogue. No `tally clock` runs (nothing here waits for the sweeper).
- then the same figures on the embedded default (SQLite file, in-process broker and workers inside
  the web process), as information with no floor, with --quick's sizes (shorter still for P1, P3's
  paced rounds and P4). There the workers cannot
  be stopped, so P2/P2b are timed from the first store to the last event applied (a fixed set of
  webhooks for P2b), and the baselines are SQLite's: single-row INSERT transactions and 64 threads
  updating one row, with Tally's pragmas (WAL, synchronous=NORMAL).

The figures (the issue's table), each divided by a bare baseline measured in the same run:

- P1: signed Stripe webhooks accepted/s (wrk -t1 -c32, distinct events pre-signed right before the
  round) ÷ POSTs of the same bodies to `/bare` (mean of a bare round before and after). The worker
  is stopped, so the web process has the machine to itself and the accepted events wait in Redis.
  The events are six-event subscription lifecycles (created, invoice.paid, two updates, a renewal's
  invoice.paid and update; workload.subscription_lifecycle).
- P2b: those stored events (all that P1 stored, so P1 always brings P2b along; without P1 a fixed
  set of 3,000 events, 1,200 with --quick, stored the same way by a closed-loop client) applied/s by
  one worker: the worker is started and timed from its "ready for action" line until no inbox event
  is pending ÷ single-row INSERT + COMMIT transactions/s from one psycopg connection (the mean of a
  round before P2b and one after P2).
- P2: 8,000 usage events (sum meter, 1..5 units each) over 50 customers, stored by `/events/ingest`
  in batches of 80 (each batch one customer's, two per customer) while the worker is stopped, then applied/s by the
  worker, timed as P2b ÷ the same bare INSERTs. One of the 50 customers has a 100-credit hard cap,
  so some events are refused: "applied or refused" is checked, not assumed. ("Nothing pending" is read
  from `usage_events.status` / `inbox_events.status`, polled every 20 ms.)
- P3: `GET /usage?customer_id=` and `GET /credit-entitlements/{ce}/balances/{customer}` (service
  token, round robin over the 50 customers) req/s at wrk -c32 ÷ `GET /bare`; then each of the three
  paced at 1,000 req/s over 32 connections (bench/httpload.py, latency from the intended send time),
  floor: p99 within 3 ms of the bare GET's paced p99.
- P4: single-event ingests paced at 500/s for 20 s over 256 connections, worker running; per event
  the time from its 2xx answer to the event no longer pending in `usage_events` (the worker commits
  status and deduction together), polled every ~2 ms by the client process. "Held" = 2xx answers /
  (last answer - start) >= 97 % of 500/s with nothing left unsent.
- P5: synchronous debits through `…/ledger-entries` on ONE balance (overage disabled) from wrk -c64
  with distinct idempotency keys ÷ `pgbench -n -c 64 -j 2` running `UPDATE … SET v = v + 1` on one
  row. Zero overshoot: a second balance of 1,000 credits is hit by 1,000 debits of 3 from 64
  connections (closed loop, every answer read): exactly 333 accepted, 667 refused, balance 1, no
  entry ever below zero. The PostgreSQL server is shared (max_connections 100): pgbench waits up to
  90 s for 64 free connections, else the row says so and the run fails.
- Memory: VmRSS of the web process and of the worker's largest process, sampled every 0.5 s during
  every phase (a worker's samples start at its ready line); floor < 250 MB each, and flat: over the
  second half of every load phase it grows by at most 10 MB (the first half is allowed its warm-up:
  pools, caches). The CPU of web, worker, PostgreSQL and Redis per phase is printed under the table.

After the run (and within phases) the counts must be exact: every delivery stored once and every
inbox event processed or skipped (none pending or failed), every usage event applied or refused
(none pending), the credits deducted equal to the units of the applied events, and `tally verify`
clean. The bench exits 1 when any of that fails (floors only print FAIL; `--strict` makes them fail
the exit code too). Results are also written as JSON to bench/results/latest.json and a dated copy
(git-ignored); `--profile` adds py-spy stacks of each phase there and a summary (bench/profile.py).

Durations (full run; --quick in DURATIONS below): P1 bare 5 s, webhooks 4 s, bare 5 s; bare INSERT
rounds 5 s; P3 wrk rounds 6 s and paced rounds 6 s; P4 20 s; pgbench and P5's wrk 6 s. The whole
`make bench` takes 5-7 minutes on this machine, most of it spent waiting for today's slow drains.

The ratio within one run is what counts: this machine is shared and absolute figures move 2x.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import httpload, loadgen, profile, workload
from bench.stack import Stack

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
FIGURES = ("P1", "P2", "P2b", "P3", "P4", "P5")

DURATIONS = {
    "full": dict(
        p1_bare=5,
        # Every event P1 stores is drained (and timed) by P2b, so the round is short: at the floors (P1
        # ~5x faster than P2b) a 4 s round costs ~20 s of drain; while intake is far ahead of the
        # worker (25x when this was written) it costs minutes, and the run grows with it.
        p1_webhook=4,
        inserts=5,
        p2_events=8000,
        p2b_default=3000,
        p3_wrk=6,
        p3_paced=6,
        p4=20,
        p5_pgbench=6,
        p5_wrk=6,
    ),
    "quick": dict(
        p1_bare=3,
        p1_webhook=2,
        inserts=2,
        p2_events=2000,
        p2b_default=1200,
        p3_wrk=3,
        p3_paced=4,
        p4=6,
        p5_pgbench=3,
        p5_wrk=3,
    ),
}
EMBEDDED_DURATIONS = dict(DURATIONS["quick"], p3_paced=3, p4=5)  # information only: kept short
USAGE_CUSTOMERS = 50
P2_BATCH = 80
P3_PACED_RATE = 1000
P4_RATE, P4_CONNECTIONS = 500, 256
P5_OVERSHOOT_REQUESTS = 1000
RSS_LIMIT_MB, RSS_FLAT_MB = 250, 10
DRAIN_TIMEOUT = 600


def log(message: str) -> None:
    print(message, flush=True)


@dataclass
class Row:
    figure: str
    tally: str = ""
    baseline: str = ""
    ratio: float | None = None
    p50: str = ""
    p99: str = ""
    rss: str = ""
    floor: str = ""
    passed: bool | None = None  # None: information only
    notes: list[str] = field(default_factory=list)
    phase: str = ""  # whose RSS and CPU samples belong to the row (filled in once the phase has ended)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}/s"


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.2f} s" if ms >= 10_000 else f"{ms:.1f} ms"


def fmt_share(share: float | None) -> str:
    return "?" if share is None else f"{share * 100:.0f}%"


class Run:
    """One stack (PostgreSQL + Redis, or the embedded default) through the selected figures."""

    def __init__(self, kind: str, selected: set[str], durations: dict[str, Any], workdir: Path, run_id: str):
        self.kind, self.selected, self.d, self.run_id = kind, selected, durations, run_id
        self.stack = Stack(kind, workdir, log)
        self.rows: list[Row] = []
        self.checks: list[Check] = []
        self.details: dict[str, Any] = {"kind": kind, "durations": durations}
        self.memory: dict[str, dict[str, Any]] = {}  # phase -> role -> summary
        self.worker_running = False
        self.base = ""
        self.expected_inbox = 0
        self.expected_usage_units: dict[str, int] = {}  # event_id -> units, of every usage event stored

    # --- plumbing ----------------------------------------------------------------------------------

    @property
    def postgres(self) -> bool:
        return self.kind == "postgres"

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        if not ok:
            log(f"  CHECK FAILED: {name}: {detail}")
        return bool(ok)

    def phase(self, name: str, body: Callable[[], Any]) -> Any:
        log(f"[{self.kind}] {name}")
        self.stack.sampler.begin()
        if name in FIGURES:
            self.stack.start_profiles(name)
        try:
            return body()
        finally:
            self.stack.stop_profiles()
            self.memory[name] = self.stack.sampler.end()

    def worker(self, on: bool) -> float | None:
        """Start or stop the worker process (PostgreSQL); returns the time it was ready."""
        if not self.postgres or on == self.worker_running:
            return None
        self.worker_running = on
        if on:
            return self.stack.start_worker()
        self.stack.stop("worker")
        return None

    def wait_for(self, sql: str, timeout: float = DRAIN_TIMEOUT, interval: float = 0.02, **params: Any) -> float | None:
        """Poll until `sql` counts 0; the monotonic time of the poll that saw it (None on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = time.monotonic()
            if self.stack.scalar(sql, **params) == 0:
                return seen
            time.sleep(interval)
        return None

    def settle(self, sql: str, quiet: float = 1.0, timeout: float = 60, **params: Any) -> Any:
        """A count once it has stopped moving: a client that stops (wrk) leaves requests in flight at the
        server, which finishes them after the client has gone."""
        value, since = self.stack.scalar(sql, **params), time.monotonic()
        deadline = since + timeout
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.stack.scalar(sql, **params)
            if now != value:
                value, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return value

    def post_all(
        self,
        requests: list[tuple[str, str, dict[str, str], str | None]],
        connections: int = 8,
    ) -> list[tuple[int, int, bytes]]:
        """Closed-loop requests from this process; (index, status, body) of each, every answer read."""
        host = f"127.0.0.1:{self.stack.web_port}"
        encoded = [httpload.http_request(method, path, host, headers, body) for method, path, headers, body in requests]
        outcome = httpload.run(
            httpload.run_load(
                "127.0.0.1",
                self.stack.web_port,
                encoded.__getitem__,
                count=len(encoded),
                connections=connections,
                keep_bodies=True,
            )
        )
        if outcome.lost:
            raise RuntimeError(f"{outcome.lost} requests got no answer: {dict(outcome.errors)}")
        return sorted(outcome.bodies)

    def auth(self, json_body: bool = False) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.stack.token}"}
        if json_body:
            headers["Content-Type"] = "application/json"
        return headers

    # --- the run --------------------------------------------------------------------------------------

    def execute(self) -> None:
        catalogue = workload.write_catalogue(self.stack.dir)
        self.phase("setup", lambda: self.setup(catalogue))
        if "P1" in self.selected:
            self.phase("P1", self.p1)
        if self.selected & {"P1", "P2", "P2b"}:
            # The bare INSERT baseline before and after the two drains; their mean is the divisor.
            self.inserts = [self.phase("bare INSERTs", self.bare_inserts)]
            if "P2b" in self.selected or "P1" in self.selected:
                self.phase("P2b", self.p2b)  # also drains what P1 stored
            if "P2" in self.selected:
                self.phase("P2", self.p2)
            self.inserts.append(self.phase("bare INSERTs again", self.bare_inserts))
            self.fill_drain_rows()
        if "P3" in self.selected:
            self.phase("P3", self.p3)
        if "P4" in self.selected:
            self.phase("P4", self.p4)
        if "P5" in self.selected:
            self.phase("P5", self.p5)
        self.worker(False)
        self.finish()

    def setup(self, catalogue: Path) -> None:
        stack = self.stack
        stack.prepare(catalogue, workload.STRIPE_SECRET)
        stack.start_web()
        self.base = f"http://127.0.0.1:{stack.web_port}"
        self.worker(True)
        rid = self.run_id
        # The first customer has a 100-credit hard cap (the first P2 batch is its: some events are refused).
        self.usage_customers = [f"cus_us_{rid}"] + [f"cus_u_{rid}_{n}" for n in range(USAGE_CUSTOMERS - 1)]
        self.big_customers = self.usage_customers[1:]
        self.debit_large, self.debit_small = f"cus_dl_{rid}", f"cus_ds_{rid}"
        plans = [(c, workload.PRICE_USAGE) for c in self.big_customers] + [
            (self.usage_customers[0], workload.PRICE_USAGE_SMALL),
            (self.debit_large, workload.PRICE_DEBIT_LARGE),
            (self.debit_small, workload.PRICE_DEBIT_SMALL),
        ]
        now = int(time.time())
        requests = []
        for customer, price in plans:
            body, headers = workload.signed_request(workload.subscription_created("setup", customer, price, now), now)
            requests.append(("POST", "/webhooks/stripe", headers, body))
        answers = self.post_all(requests)
        bad = [(status, body[:200]) for _, status, body in answers if status != 200]
        self.check("setup: every subscription.created webhook answered 200", not bad, str(bad[:3]))
        self.expected_inbox += len(requests)
        done = self.wait_for("SELECT count(*) FROM inbox_events WHERE status = 'pending'", timeout=120)
        self.check("setup: the subscription webhooks were applied", done is not None)
        balances = stack.scalar("SELECT count(*) FROM balances WHERE customer_id LIKE :p", p=f"cus_%_{rid}%")
        self.check("setup: one balance per customer", balances == len(plans), f"{balances} of {len(plans)}")
        self.worker(False)
        log(f"  {len(plans)} customers with balances; service token from `tally keys create --service`")

    # --- P1 -----------------------------------------------------------------------------------------

    def p1(self) -> None:
        d, stack = self.d, self.stack
        self.worker(False)
        bare_list = workload.write_signed_lifecycles(stack.dir / "p1_bare.tsv", f"bare{self.run_id}", 3000)
        bare1 = loadgen.wrk(
            f"{self.base}/bare", ["post-list", "/bare", str(bare_list.path)], connections=32, seconds=d["p1_bare"]
        )
        log(f"  bare POST: {fmt_rate(bare1['rate'])} (wrk CPU {fmt_share(bare1['client_cpu_share'])} of a core)")
        # As many distinct events as even the bare rate could take, signed now (300 s tolerance).
        wanted = int(max(bare1["rate"], 500) * d["p1_webhook"] * 1.3)
        started = time.monotonic()
        prefix = f"p1{self.run_id}"
        events = workload.write_signed_lifecycles(stack.dir / "p1_events.tsv", prefix, wanted)
        log(f"  signed {events.count} distinct events in {time.monotonic() - started:.1f} s")
        hook = loadgen.wrk(
            f"{self.base}/webhooks/stripe",
            ["post-list", "/webhooks/stripe", str(events.path)],
            connections=32,
            seconds=d["p1_webhook"],
        )
        log(
            f"  webhooks: {fmt_rate(hook['rate'])}, p50 {fmt_ms(hook['p50_ms'])}, p99 {fmt_ms(hook['p99_ms'])} "
            f"(wrk CPU {fmt_share(hook['client_cpu_share'])})"
        )
        bare2 = loadgen.wrk(
            f"{self.base}/bare", ["post-list", "/bare", str(bare_list.path)], connections=32, seconds=d["p1_bare"]
        )
        bare_rate = (bare1["rate"] + bare2["rate"]) / 2
        log(f"  bare POST again: {fmt_rate(bare2['rate'])}")
        stored = self.settle("SELECT count(*) FROM inbox_events WHERE provider_event_id LIKE :p", p=f"evt_{prefix}_%")
        self.expected_inbox += stored
        self.p1_stored = stored
        self.check(
            "P1: every webhook answered 2xx",
            hook["non_2xx"] == 0 and hook["socket_errors"] == 0,
            f"non-2xx {hook['non_2xx']} (5xx {hook['s5xx']}), socket errors {hook['socket_errors']}",
        )
        self.check(
            "P1: no event sent twice (the signed list was long enough)",
            hook["wraps"] == 0,
            f"list wrapped {hook['wraps']} times",
        )
        self.check(
            "P1: each accepted delivery stored once",
            hook["s2xx"] <= stored <= hook["s2xx"] + 32,
            f"{stored} stored for {hook['s2xx']} 2xx answers (+ up to 32 in flight at the end)",
        )
        ratio = hook["rate"] / bare_rate if bare_rate else None
        self.details["P1"] = {"webhook": hook, "bare": [bare1, bare2], "stored": stored, "mix": workload.MIX}
        self.rows.append(
            Row(
                "P1 webhooks accepted/s",
                fmt_rate(hook["rate"]),
                f"bare POST {fmt_rate(bare_rate)}",
                ratio,
                fmt_ms(hook["p50_ms"]),
                fmt_ms(hook["p99_ms"]),
                "",
                ">= 0.4" if self.postgres else "",
                (ratio is not None and ratio >= 0.4) if self.postgres else None,
                [f"wrk -t1 -c32, wrk CPU {fmt_share(hook['client_cpu_share'])} of a core; {stored} events stored"],
                phase="P1",
            )
        )

    # --- P2b / P2 -------------------------------------------------------------------------------------

    def bare_inserts(self) -> dict[str, Any]:
        if self.postgres:
            result = loadgen.bare_inserts_postgres(self.stack.database_url, self.d["inserts"])
        else:
            result = loadgen.bare_inserts_sqlite(self.stack.dir / "bare.sqlite", self.d["inserts"])
        log(f"  bare single-row INSERT transactions: {fmt_rate(result['rate'])}")
        self.details.setdefault("bare_inserts", []).append(result)
        return result

    def p2b(self) -> None:
        """PostgreSQL: apply what P1 stored (or a fixed set), worker started after storing.
        Embedded: the in-process workers apply while the events arrive, so P1's events (applied during
        P1 and the rounds after it) are drained untimed and a fixed set is stored and timed here."""
        stack = self.stack
        pending_sql = "SELECT count(*) FROM inbox_events WHERE status = 'pending'"
        if not self.postgres:
            self.check("P2b: the events stored before were applied", self.wait_for(pending_sql) is not None)
        if not (self.postgres and hasattr(self, "p1_stored")):
            self.worker(False)
            prefix = f"p2b{self.run_id}"
            lines = workload.write_signed_lifecycles(stack.dir / "p2b.tsv", prefix, self.d["p2b_default"])
            requests = []
            for line in lines.path.read_text().splitlines():
                signature, body = line.split("\t", 1)
                requests.append(
                    (
                        "POST",
                        "/webhooks/stripe",
                        {"Stripe-Signature": signature, "Content-Type": "application/json"},
                        body,
                    )
                )
            started = time.monotonic()
            answers = self.post_all(requests, connections=32)
            self.check("P2b: every delivery answered 200", all(s == 200 for _, s, _ in answers))
            self.expected_inbox += len(requests)
        total = stack.scalar(pending_sql) if self.postgres else len(requests)
        if self.postgres:
            started = self.worker(True)
        done = self.wait_for(pending_sql)
        self.check("P2b: every stored webhook event applied", done is not None, f"{total} were pending")
        rate = total / (done - started) if done and started and done > started else None
        statuses = dict(stack.sql("SELECT status, count(*) FROM inbox_events GROUP BY status"))
        self.check("P2b: no inbox event failed", statuses.get("failed", 0) == 0, str(statuses))
        self.finish_drain_row("P2b Stripe events applied/s", rate, total, ">= 0.5", 0.5, statuses)
        self.worker(False)

    def p2(self) -> None:
        stack = self.stack
        self.worker(False)
        prefix = f"p2{self.run_id}"
        batches = workload.ingest_batches(prefix, self.usage_customers, self.d["p2_events"], P2_BATCH)
        requests = [
            ("POST", "/events/ingest", self.auth(True), json.dumps({"events": events})) for _, events in batches
        ]
        started = time.monotonic()
        answers = self.post_all(requests, connections=8)
        stored_in = time.monotonic() - started
        ingested = sum(json.loads(body).get("ingested_count", 0) for _, status, body in answers if status == 200)
        self.check(
            "P2: every ingest batch answered 200 and counted whole",
            ingested == self.d["p2_events"],
            f"ingested_count total {ingested} of {self.d['p2_events']}",
        )
        for _, events in batches:
            for event in events:
                self.expected_usage_units[event["event_id"]] = event["metadata"][workload.USAGE_KEY]
        log(f"  {ingested} usage events stored in {stored_in:.1f} s ({len(batches)} batches of {P2_BATCH})")
        begun = self.worker(True) if self.postgres else started
        done = self.wait_for("SELECT count(*) FROM usage_events WHERE status = 'pending'")
        self.check("P2: every usage event applied or refused", done is not None)
        rate = ingested / (done - begun) if done and begun and done > begun else None
        statuses = dict(
            stack.sql(
                "SELECT status, count(*) FROM usage_events WHERE event_id LIKE :p GROUP BY status", p=f"{prefix}-%"
            )
        )
        self.check(
            "P2: applied + refused = stored",
            statuses.get("applied", 0) + statuses.get("refused", 0) == ingested,
            str(statuses),
        )
        self.check("P2: the capped customer's excess was refused", statuses.get("refused", 0) > 0, str(statuses))
        self.finish_drain_row("P2 usage events applied/s", rate, ingested, ">= 1.0", 1.0, statuses)

    def finish_drain_row(
        self, figure: str, rate: float | None, total: int, floor: str, minimum: float, statuses: dict[str, int]
    ) -> None:
        phase = figure.split()[0]
        method = (
            "worker started after storing; timed from its ready line to nothing pending"
            if self.postgres
            else "applied in-process while being stored; timed from the first store"
        )
        self.details[phase] = {"rate": rate, "events": total, "statuses": statuses, "method": method}
        log(f"  {phase}: {total} events, {fmt_rate(rate)} ({statuses})")
        row = Row(
            figure,
            fmt_rate(rate),
            "",
            None,
            "",
            "",
            "",
            floor if self.postgres else "",
            None,
            [f"{total} events; {method}"],
            phase=phase,
        )
        row.minimum, row.rate = minimum, rate  # type: ignore[attr-defined]
        self.rows.append(row)

    def fill_drain_rows(self) -> None:
        """P2 and P2b divide by the mean of the bare INSERT rounds around them."""
        rates = [r["rate"] for r in getattr(self, "inserts", [])]
        bare = sum(rates) / len(rates) if rates else None
        for row in self.rows:
            if hasattr(row, "minimum"):
                row.baseline = f"bare INSERT {fmt_rate(bare)}"
                row.ratio = row.rate / bare if row.rate and bare else None
                row.passed = (row.ratio is not None and row.ratio >= row.minimum) if self.postgres else None
                row.notes.append("bare INSERT rounds: " + ", ".join(fmt_rate(r) for r in rates))
                del row.minimum, row.rate

    # --- P3 ----------------------------------------------------------------------------------------------

    def p3(self) -> None:
        stack, d = self.stack, self.d
        targets = {
            "bare": ["/bare"],
            "usage": [f"/usage?customer_id={c}" for c in self.usage_customers],
            "balance": [
                f"/credit-entitlements/{workload.USAGE_ENTITLEMENT}/balances/{c}" for c in self.usage_customers
            ],
        }
        saturated, paced = {}, {}
        for name, paths in targets.items():
            path_file = stack.dir / f"p3_{name}.txt"
            path_file.write_text("\n".join(paths) + "\n")
            saturated[name] = loadgen.wrk(
                f"{self.base}/", ["get-list", str(path_file), stack.token], connections=32, seconds=d["p3_wrk"]
            )
            r = saturated[name]
            log(
                f"  GET {name} at -c32: {fmt_rate(r['rate'])}, p99 {fmt_ms(r['p99_ms'])} "
                f"(wrk CPU {fmt_share(r['client_cpu_share'])}, non-2xx {r['non_2xx']})"
            )
        for name, paths in targets.items():
            paced[name] = loadgen.httpload(
                {
                    "host": "127.0.0.1",
                    "port": stack.web_port,
                    "kind": "get",
                    "paths": paths,
                    "token": stack.token,
                    "rate": P3_PACED_RATE,
                    "duration": d["p3_paced"],
                    "connections": 32,
                    "grace": 1.0,
                },
                stack.dir,
                f"p3_paced_{name}",
                timeout=d["p3_paced"] + 90,
            )
            r = paced[name]
            log(
                f"  GET {name} paced {P3_PACED_RATE}/s: held {fmt_rate(r['rate'])}, p50 {fmt_ms(r['p50_ms'])}, "
                f"p99 {fmt_ms(r['p99_ms'])}, unsent {r['unsent']} "
                f"(client CPU {fmt_share(r['client_cpu']['share_of_one_core'])})"
            )
        for name in targets:
            bad = (
                saturated[name]["non_2xx"]
                + saturated[name]["socket_errors"]
                + sum(v for k, v in paced[name]["statuses"].items() if not k.startswith("2"))
                + paced[name]["lost"]
            )
            self.check(f"P3: every GET {name} answered 2xx", bad == 0, f"{bad} errors")
        self.details["P3"] = {"saturated": saturated, "paced": paced}
        bare, bare_paced = saturated["bare"], paced["bare"]
        for name, label in (("usage", "GET /usage"), ("balance", "GET …/balances/{customer}")):
            r, p = saturated[name], paced[name]
            ratio = r["rate"] / bare["rate"] if bare["rate"] else None
            self.rows.append(
                Row(
                    f"P3 {label} req/s",
                    fmt_rate(r["rate"]),
                    f"bare GET {fmt_rate(bare['rate'])}",
                    ratio,
                    fmt_ms(r["p50_ms"]),
                    fmt_ms(r["p99_ms"]),
                    "",
                    ">= 0.25" if self.postgres else "",
                    (ratio is not None and ratio >= 0.25) if self.postgres else None,
                    [f"wrk -t1 -c32, wrk CPU {fmt_share(r['client_cpu_share'])}"],
                    phase="P3",
                )
            )
            delta = p["p99_ms"] - bare_paced["p99_ms"] if p["p99_ms"] is not None and bare_paced["p99_ms"] else None
            held = p["unsent"] == 0 and p["rate"] >= 0.97 * P3_PACED_RATE
            self.rows.append(
                Row(
                    f"P3 {label} paced {P3_PACED_RATE}/s p99",
                    f"{fmt_rate(p['rate'])} held" if held else f"{fmt_rate(p['rate'])} NOT held",
                    f"bare p99 {fmt_ms(bare_paced['p99_ms'])}",
                    None,
                    fmt_ms(p["p50_ms"]),
                    fmt_ms(p["p99_ms"]),
                    "",
                    "p99 <= bare + 3 ms" if self.postgres else "",
                    (held and delta is not None and delta <= 3.0) if self.postgres else None,
                    [
                        f"p99 - bare p99 = {delta:+.1f} ms" if delta is not None else "no p99",
                        f"32 connections, client CPU {fmt_share(p['client_cpu']['share_of_one_core'])} of a core",
                    ],
                )
            )

    # --- P4 ----------------------------------------------------------------------------------------------

    def p4(self) -> None:
        stack, d = self.stack, self.d
        self.worker(True)
        prefix = f"p4{self.run_id}"
        r = loadgen.httpload(
            {
                "host": "127.0.0.1",
                "port": stack.web_port,
                "kind": "ingest",
                "customers": self.big_customers,
                "prefix": prefix,
                "event_name": workload.USAGE_EVENT,
                "key": workload.USAGE_KEY,
                "token": stack.token,
                "rate": P4_RATE,
                "duration": d["p4"],
                "connections": P4_CONNECTIONS,
                "grace": 2.0,
                "poll_database": stack.database_url,
                "visible_timeout": 90,
            },
            stack.dir,
            "p4",
            timeout=d["p4"] + 240,
        )
        ok = r["statuses"].get("200", 0)
        ingested_ok = r["ingested_bodies"].get('{"ingested_count":1}', 0)
        stored = stack.scalar("SELECT count(*) FROM usage_events WHERE event_id LIKE :p", p=f"{prefix}-%")
        for n in range(r["planned"]):
            self.expected_usage_units[f"{prefix}-{n}"] = 1
        self.p4_stored = stored
        self.check(
            "P4: every ingest answered 200 {ingested_count: 1}",
            ok == ingested_ok == r["answered"],
            f"statuses {r['statuses']}, lost {r['lost']}",
        )
        self.check(
            "P4: every answered event stored once", ok <= stored <= ok + r["lost"], f"{stored} stored for {ok} answers"
        )
        self.check(
            "P4: every answered event's deduction became visible",
            r["not_visible"] == 0,
            f"{r['not_visible']} still pending after the timeout",
        )
        held = r["unsent"] == 0 and r["rate"] >= 0.97 * P4_RATE
        p99 = r["visible_p99_ms"]
        log(
            f"  ingests: {fmt_rate(r['rate'])} answered ({'held' if held else 'NOT held'}; unsent {r['unsent']}), "
            f"answer p99 {fmt_ms(r['p99_ms'])}; answer -> visible p50 {fmt_ms(r['visible_p50_ms'])}, "
            f"p99 {fmt_ms(p99)}, max {fmt_ms(r['visible_max_ms'])}; client CPU "
            f"{fmt_share(r['client_cpu_with_poller']['share_of_one_core'])} with the poller"
        )
        self.details["P4"] = r
        self.rows.append(
            Row(
                "P4 ingest answer -> deduction visible",
                f"{fmt_rate(r['rate'])} {'held' if held else 'NOT held'}",
                f"paced {P4_RATE}/s",
                None,
                fmt_ms(r["visible_p50_ms"]),
                fmt_ms(p99),
                "",
                "500/s held, p99 < 100 ms" if self.postgres else "",
                (held and p99 is not None and p99 < 100) if self.postgres else None,
                [
                    f"{P4_CONNECTIONS} connections, {d['p4']} s; ingest answer p50 {fmt_ms(r['p50_ms'])} "
                    f"p99 {fmt_ms(r['p99_ms'])}; client CPU "
                    f"{fmt_share(r['client_cpu_with_poller']['share_of_one_core'])} of a core incl. the 2 ms poller"
                ],
                phase="P4",
            )
        )

    # --- P5 ----------------------------------------------------------------------------------------------

    def p5(self) -> None:
        stack, d = self.stack, self.d
        self.worker(False)  # not part of P5; its idle pooled connections are needed by pgbench's 64
        if self.postgres:
            base = None
            deadline = time.monotonic() + 90
            while True:  # the server is shared: 64 clients need 64 free connections
                free, limit = stack.free_connections()
                if free >= 64 + 2 or time.monotonic() > deadline:
                    break
                log(f"  waiting for 66 free connections for pgbench ({free} of max_connections {limit} free)")
                time.sleep(3)
            if free >= 64 + 2:
                base = loadgen.pgbench_updates(stack.database_name, d["p5_pgbench"], 64, stack.dir)
                base_label = f"pgbench UPDATE {fmt_rate(base['rate'])}"
            else:
                base = {"rate": None, "error": f"only {free} of max_connections {limit} free"}
                base_label = "pgbench: no 64 connections free"
                self.check(
                    "P5: the pgbench baseline ran (64 free connections on the shared server)", False, base["error"]
                )
        else:
            base = loadgen.sqlite_updates(stack.dir / "bare.sqlite", d["p5_pgbench"], 64)
            base_label = f"sqlite UPDATE {fmt_rate(base['rate'])}"
        log(f"  bare one-row UPDATEs from 64 clients: {fmt_rate(base['rate'])}")
        if self.postgres:
            free, limit = stack.free_connections()
            self.details["P5_connections_free_before_debits"] = free
            if free < 64 + 12:
                log(
                    f"  note: only {free} of {limit} connections free on the shared server; the web process "
                    "may open up to 30 (pool 20 + overflow 10)"
                )
        ce = workload.DEBIT_ENTITLEMENT
        prefix = f"p5t{self.run_id}"
        r = loadgen.wrk(
            f"{self.base}/",
            [
                "debit",
                f"/credit-entitlements/{ce}/balances/{self.debit_large}/ledger-entries",
                stack.token,
                prefix,
                "1",
            ],
            connections=64,
            seconds=d["p5_wrk"],
        )
        log(
            f"  debits on one balance at -c64: {fmt_rate(r['rate'])}, p50 {fmt_ms(r['p50_ms'])}, "
            f"p99 {fmt_ms(r['p99_ms'])} (wrk CPU {fmt_share(r['client_cpu_share'])}, non-2xx {r['non_2xx']})"
        )
        self.check(
            "P5: every debit on the large balance answered 201",
            r["non_2xx"] == 0 and r["socket_errors"] == 0,
            f"400 {r['s400']}, other 4xx {r['s4xx']}, 5xx {r['s5xx']}, socket errors {r['socket_errors']}",
        )
        self.settle("SELECT count(*) FROM ledger_entries WHERE idempotency_key LIKE :p", p=f"{prefix}-%")
        entries, large = stack.sql(  # one statement: one snapshot
            "SELECT (SELECT count(*) FROM ledger_entries WHERE idempotency_key LIKE :p), "
            "(SELECT balance FROM balances WHERE customer_id = :c AND entitlement_id = :e)",
            p=f"{prefix}-%",
            c=self.debit_large,
            e=ce,
        )[0]
        self.check(
            "P5: debits on the large balance: each answer one entry, the balance exact",
            r["s2xx"] <= entries <= r["s2xx"] + 64 and workload.LARGE - large == entries,
            f"{entries} entries for {r['s2xx']} answers (+ up to 64 in flight); balance {large}",
        )

        # Zero overshoot: 1000 debits of 3 on a 1000-credit balance, 64 at a time, every answer read.
        over_prefix = f"p5o{self.run_id}"
        o = loadgen.httpload(
            {
                "host": "127.0.0.1",
                "port": stack.web_port,
                "kind": "debit",
                "amount": workload.DEBIT_AMOUNT_SMALL,
                "path": f"/credit-entitlements/{ce}/balances/{self.debit_small}/ledger-entries",
                "prefix": over_prefix,
                "token": stack.token,
                "count": P5_OVERSHOOT_REQUESTS,
                "connections": 64,
            },
            stack.dir,
            "p5_overshoot",
            timeout=300,
        )
        accepted, refused = o["statuses"].get("201", 0), o["statuses"].get("400", 0)
        expected_accepted = workload.DEBIT_SMALL_INCLUDED // workload.DEBIT_AMOUNT_SMALL
        small = stack.sql(
            "SELECT balance, overage FROM balances WHERE customer_id = :c AND entitlement_id = :e",
            c=self.debit_small,
            e=ce,
        )[0]
        lowest = stack.scalar(
            "SELECT min(l.balance_after) FROM ledger_entries l JOIN balances b ON b.id = l.balance_id "
            "WHERE b.customer_id = :c AND b.entitlement_id = :e",
            c=self.debit_small,
            e=ce,
        )
        small_entries = stack.scalar(
            "SELECT count(*) FROM ledger_entries WHERE idempotency_key LIKE :p", p=f"{over_prefix}-%"
        )
        overshoot_ok = (
            accepted == expected_accepted == small_entries
            and refused == P5_OVERSHOOT_REQUESTS - accepted
            and small[0] == workload.DEBIT_SMALL_INCLUDED - accepted * workload.DEBIT_AMOUNT_SMALL
            and small[1] == 0
            and lowest >= 0
            and o["lost"] == 0
        )
        self.check(
            "P5: zero overshoot (accepted x amount = consumed, never below zero)",
            overshoot_ok,
            f"{accepted} accepted (expected {expected_accepted}), {refused} refused, {small_entries} entries, "
            f"balance {small[0]} overage {small[1]}, lowest balance_after {lowest}, other {o['statuses']}",
        )
        log(
            f"  overshoot check: {accepted} x {workload.DEBIT_AMOUNT_SMALL} accepted, {refused} refused, "
            f"balance {small[0]}, lowest {lowest}: {'exact' if overshoot_ok else 'WRONG'}"
        )
        ratio = r["rate"] / base["rate"] if base.get("rate") else None
        self.details["P5"] = {"debits": r, "baseline": base, "overshoot": o, "overshoot_ok": overshoot_ok}
        self.rows.append(
            Row(
                "P5 debits/s on one balance",
                fmt_rate(r["rate"]),
                base_label,
                ratio,
                fmt_ms(r["p50_ms"]),
                fmt_ms(r["p99_ms"]),
                "",
                ">= 0.5, zero overshoot" if self.postgres else "",
                (ratio is not None and ratio >= 0.5 and overshoot_ok) if self.postgres else None,
                [
                    f"wrk -t1 -c64, wrk CPU {fmt_share(r['client_cpu_share'])}; pgbench -c64 -j2 CPU "
                    f"{fmt_share(base.get('client_cpu_share'))}; overshoot {'none' if overshoot_ok else 'FOUND'} "
                    f"({accepted} of {P5_OVERSHOOT_REQUESTS} debits of {workload.DEBIT_AMOUNT_SMALL} accepted on "
                    f"{workload.DEBIT_SMALL_INCLUDED} credits)"
                ]
                if self.postgres
                else [f"overshoot {'none' if overshoot_ok else 'FOUND'}"],
                phase="P5",
            )
        )

    # --- the end --------------------------------------------------------------------------------------

    def finish(self) -> None:
        stack = self.stack
        inbox = dict(stack.sql("SELECT status, count(*) FROM inbox_events GROUP BY status"))
        self.check(
            "end: every webhook stored once and processed or skipped",
            sum(inbox.values()) == self.expected_inbox and set(inbox) <= {"processed", "skipped"},
            f"{inbox}, expected {self.expected_inbox} rows",
        )
        usage = dict(stack.sql("SELECT status, count(*) FROM usage_events GROUP BY status"))
        stored_usage = sum(usage.values())
        expected_stored = self.d["p2_events"] * ("P2" in self.selected) + getattr(self, "p4_stored", 0)
        self.check(
            "end: every usage event applied or refused, none pending",
            stored_usage == expected_stored and set(usage) <= {"applied", "refused"},
            f"{usage}, expected {expected_stored} events",
        )
        if stored_usage:
            applied = [row[0] for row in stack.sql("SELECT event_id FROM usage_events WHERE status = 'applied'")]
            units = sum(self.expected_usage_units[event_id] for event_id in applied)
            deducted = -stack.scalar(
                "SELECT coalesce(sum(l.amount), 0) FROM ledger_entries l JOIN balances b ON b.id = l.balance_id "
                "WHERE b.entitlement_id = :e AND l.usage_event_id IS NOT NULL",
                e=workload.USAGE_ENTITLEMENT,
            )
            with_entries = stack.scalar(
                "SELECT count(DISTINCT usage_event_id) FROM ledger_entries WHERE usage_event_id IS NOT NULL"
            )
            self.check(
                "end: credits deducted = units of the applied usage events, one entry each",
                deducted == units and with_entries == len(applied),
                f"deducted {deducted}, units {units}; {with_entries} events with entries of {len(applied)} applied",
            )
            capped = stack.scalar(
                "SELECT balance FROM balances WHERE customer_id = :c AND entitlement_id = :e",
                c=self.usage_customers[0],
                e=workload.USAGE_ENTITLEMENT,
            )
            self.check("end: the capped customer's balance never went below zero", capped >= 0, f"balance {capped}")
        verify = stack.tally("verify", check=False)
        code = stack.last_tally.returncode
        self.check("end: tally verify is clean", code == 0, (verify + stack.last_tally.stderr).strip()[-500:])
        self.details["verify"] = {"exit": code, "output": verify.strip()[-2000:]}
        # Memory: < 250 MB each, flat within every load phase.
        problems, peaks = [], {"web": 0.0, "worker": 0.0}
        for phase, roles in self.memory.items():
            for role, s in roles.items():
                if not s or role not in peaks:
                    continue
                peaks[role] = max(peaks[role], s["rss_max_mb"])
                if phase != "setup" and s["rss_end_mb"] - s["rss_mid_mb"] > RSS_FLAT_MB:
                    problems.append(
                        f"{role} grew {s['rss_mid_mb']:.0f} -> {s['rss_end_mb']:.0f} MB over the second half of {phase}"
                    )
        over = [f"{role} {peak:.0f} MB" for role, peak in peaks.items() if peak >= RSS_LIMIT_MB]
        flat = "; ".join(problems) or "flat in every phase"
        self.rows.append(
            Row(
                "Memory (VmRSS, max over the run)",
                f"web {peaks['web']:.0f} MB"
                + (f", worker {peaks['worker']:.0f} MB" if self.postgres else " (workers inside)"),
                "",
                None,
                "",
                "",
                "",
                f"< {RSS_LIMIT_MB} MB each, flat" if self.postgres else "",
                (not over and not problems) if self.postgres else None,
                [flat + (f"; over: {', '.join(over)}" if over else "")],
            )
        )
        self.details["memory"] = self.memory

    def rss_text(self, phase: str) -> str:
        roles = self.memory.get(phase, {})
        parts = []
        for role in ("web", "worker"):
            s = roles.get(role)
            if s:
                parts.append(f"{s['rss_start_mb']:.0f}>{s['rss_max_mb']:.0f}>{s['rss_end_mb']:.0f}")
            elif role == "worker" and self.postgres:
                parts.append("-")
        return " / ".join(parts)

    def cpu(self, phase: str, role: str) -> float | None:
        return self.memory.get(phase, {}).get(role, {}).get("cpu_share")


# The memory and CPU of a phase are known once the phase has ended, but rows are built inside it.
def _fill_rss(run: Run) -> None:
    run.fill_drain_rows()  # again, in case the run stopped before the second bare INSERT round
    for row in run.rows:
        if row.phase in run.memory:
            row.rss = run.rss_text(row.phase)
            shares = [
                f"{role} {fmt_share(run.cpu(row.phase, role))}"
                for role in ("web", "worker", "postgres", "redis")
                if run.cpu(row.phase, role) is not None
            ]
            if shares:
                row.notes.append(f"CPU during {row.phase} (share of one core): " + ", ".join(shares))


def print_table(title: str, rows: list[Row], informational: bool) -> None:
    headers = [
        "figure",
        "Tally",
        "baseline",
        "ratio",
        "p50",
        "p99",
        "RSS MB web / worker (start>max>end)",
        "floor",
        "result",
    ]
    table = []
    for row in rows:
        result = "info" if row.passed is None else ("PASS" if row.passed else "FAIL")
        table.append(
            [
                row.figure,
                row.tally,
                row.baseline,
                "" if row.ratio is None else f"{row.ratio:.3f}",
                row.p50,
                row.p99,
                row.rss,
                "-" if informational else row.floor,
                result,
            ]
        )
    widths = [
        max(len(headers[i]), *(len(r[i]) for r in table)) if table else len(headers[i]) for i in range(len(headers))
    ]
    print()
    print(title)
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for cells in table:
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    print()
    for row in rows:
        for note in row.notes:
            print(f"  {row.figure}: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="comma-separated figures among " + ",".join(FIGURES))
    parser.add_argument("--quick", action="store_true", help="shorter rounds and fewer events, for iteration")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded default (SQLite) run")
    parser.add_argument("--embedded-only", action="store_true", help="only the embedded default run")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a floor fails too")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database and files (to inspect)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the web and worker processes in every figure's phase (bench/results/profiles/)",
    )
    args = parser.parse_args()
    selected = set(FIGURES)
    if args.only:
        selected = {part.strip() for part in args.only.split(",") if part.strip()}
        unknown = selected - set(FIGURES)
        if unknown:
            parser.error(f"unknown figure(s) {', '.join(sorted(unknown))}; choose among {', '.join(FIGURES)}")
    loadgen.ensure_wrk(log)
    RESULTS.mkdir(exist_ok=True)
    workdir = RESULTS / "work"
    workdir.mkdir(exist_ok=True)
    run_id = uuid.uuid4().hex[:6]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    kinds = [] if args.embedded_only else ["postgres"]
    if not args.no_embedded:
        kinds.append("embedded")

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    runs: list[Run] = []
    harness_errors: list[str] = []
    for kind in kinds:
        durations = DURATIONS["quick" if args.quick else "full"] if kind == "postgres" else EMBEDDED_DURATIONS
        run = Run(kind, selected, durations, workdir, run_id)
        runs.append(run)
        if args.profile:
            run.stack.profile_dir = RESULTS / "profiles" / f"{stamp}"
            run.stack.profile_dir.mkdir(parents=True, exist_ok=True)
        try:
            run.execute()
        except KeyboardInterrupt:
            log(f"[{kind}] interrupted; cleaning up")
            run.stack.close(keep=args.keep)
            return 130
        except Exception as error:  # report, clean up, and fail the run
            traceback.print_exc()
            harness_errors.append(f"{kind}: {type(error).__name__}: {error}")
            run.check(f"{kind}: the run completed", False, str(error)[:500])
        finally:
            run.stack.close(keep=args.keep)
        _fill_rss(run)

    for run in runs:
        title = (
            "PostgreSQL + Redis, one web process (uvicorn), one `tally worker --processes 1 --threads 8`, "
            "load from wrk -t1"
            if run.postgres
            else "Embedded default (SQLite + in-process broker; workers inside the web process): "
            "information only, no floor"
        )
        print_table(title, run.rows, informational=not run.postgres)
        failed = [c for c in run.checks if not c.ok]
        print(
            f"  counts and `tally verify` ({run.kind}): "
            + ("all exact, verify clean" if not failed else f"{len(failed)} FAILED")
        )
        for c in failed:
            print(f"    FAIL {c.name}: {c.detail}")

    if args.profile:
        print("\nWhere the time goes (py-spy, share of non-idle samples; app/ and workers/ frames inclusive):")
        for run in runs:
            for path in run.stack.profiles:
                for line in profile.summarise(path):
                    print(f"  {line}")

    document = {
        "started_at": datetime.now(UTC).isoformat(),
        "seconds": round(time.monotonic() - started, 1),
        "selected": sorted(selected),
        "quick": args.quick,
        "harness_errors": harness_errors,
        "runs": {
            run.kind: {
                "rows": [asdict(r) for r in run.rows],
                "checks": [asdict(c) for c in run.checks],
                "details": run.details,
            }
            for run in runs
        },
    }
    for path in (RESULTS / f"bench-{stamp}.json", RESULTS / "latest.json"):
        path.write_text(json.dumps(document, indent=2, default=str))
    print(f"\n  results: {RESULTS / 'latest.json'} ({document['seconds']:.0f} s in all)")
    bad_checks = any(not c.ok for run in runs for c in run.checks)
    bad_floors = any(row.passed is False for run in runs for row in run.rows)
    if bad_checks or harness_errors:
        print("  BENCH FAILED: counts, verify or the harness (see above)")
        return 1
    if args.strict and bad_floors:
        print("  floors FAIL (--strict)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
