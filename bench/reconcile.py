"""Reconciliation benchmark (not a test): API calls per object, objects per second, peak memory.

    .venv/bin/python bench/reconcile.py [--subscriptions 50000] [--balances 50000]

The fake Stripe and Dodo APIs (tests/fakes) serve from this process; `tally reconcile` runs as a
child process against a fresh SQLite file (the embedded default) or DATABASE_URL, so its peak
resident memory (ru_maxrss of the child) is the reconciliation's own. Three runs:

1. Stripe, first run: every subscription is unknown to Tally, so each is created and granted.
2. Stripe, second run: everything matches (the nightly steady state).
3. Dodo: the mirrored balances already equal Dodo's (rows seeded in bulk), one entitlement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # before bench/, whose app.py shadows the package

from fakes.dodo_api import DodoFake  # noqa: E402
from fakes.stripe_api import StripeFake  # noqa: E402

PLANS = """
[entitlements.bench]
name = "Bench"
unit = "request"
precision = 0
overage_enabled = true

[plans.bench]
stripe_price = "price_bench"
entitlement = "bench"
included = 1000
hard_cap = "unlimited"
"""


def child(env: dict[str, str], *argv: str) -> tuple[dict[str, object] | list[object], float, float]:
    """Run `tally …` in a child; its JSON, wall seconds and peak RSS in MiB (a fresh child each time)."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report this process's
    # peak (the fakes hold 100,000 objects); VmHWM belongs to the child's own address space.
    code = (
        "import sys; from app.cli import main; rc = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "sys.stderr.write('MAXRSS %s\\n' % hwm); sys.exit(rc)"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, check=False, cwd=ROOT
    )
    elapsed = time.perf_counter() - started
    if done.returncode not in (0,):
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"tally {' '.join(argv)} exited {done.returncode}")
    rss = [line for line in done.stderr.splitlines() if line.startswith("MAXRSS ")]
    peak = int(rss[-1].split()[1]) / 1024 if rss else float("nan")
    return json.loads(done.stdout), elapsed, peak


def report(label: str, run: dict[str, object], elapsed: float, peak: float) -> None:
    counts = run["counts"]
    assert isinstance(counts, dict)
    checked = int(counts["checked"])
    calls = int(str(run["api_calls"]))
    print(
        f"| {label} | {checked} | {calls} | {calls / max(checked, 1):.4f} | {checked / elapsed:.0f} | "
        f"{peak:.0f} MiB | {counts['repaired']} | {run['status']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscriptions", type=int, default=50_000)
    parser.add_argument("--balances", type=int, default=50_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tally-bench-recon-"))
    (tmp / "plans.toml").write_text(PLANS)
    env = {
        **os.environ,
        "DATABASE_URL": os.environ.get("DATABASE_URL", f"sqlite:///{tmp}/tally.db"),
        "TALLY_PLANS": str(tmp / "plans.toml"),
        "TALLY_RECONCILE_RATE": os.environ.get("TALLY_RECONCILE_RATE", "20"),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    env.pop("REDIS_URL", None)
    env.pop("BROKER_URL", None)
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, check=True, cwd=ROOT)
    with StripeFake() as stripe_fake, DodoFake() as dodo_fake:
        stripe_fake.seed_subscriptions(args.subscriptions, price="price_bench")
        dodo_fake.add_entitlement("cde_bench", precision=0)
        customers = dodo_fake.seed_balances("cde_bench", args.balances, balance="100")
        seed_mirror(env["DATABASE_URL"], customers)
        stripe_env = {**env, "STRIPE_API_KEY": "sk_test_bench", "STRIPE_API_BASE": stripe_fake.url}
        dodo_env = {**env, "DODO_PAYMENTS_API_KEY": "dodo_bench", "DODO_PAYMENTS_BASE_URL": dodo_fake.url}
        print("| run | objects | API calls | calls/object | objects/s | peak RSS | repaired | status |")
        print("|---|---|---|---|---|---|---|---|")
        for label in ("Stripe, first run (all created)", "Stripe, second run (all match)"):
            run, elapsed, peak = child(stripe_env, "reconcile", "--provider", "stripe", "--json")
            assert isinstance(run, dict)
            report(label, run, elapsed, peak)
        run, elapsed, peak = child(dodo_env, "reconcile", "--provider", "dodo", "--json")
        assert isinstance(run, dict)
        report("Dodo balances (all match)", run, elapsed, peak)


def seed_mirror(url: str, customers: list[str]) -> None:
    """Tally's mirror of the Dodo balances, in bulk: the state after earlier nights."""
    os.environ["DATABASE_URL"] = url
    from sqlalchemy import insert

    from app.db import Database, utcnow
    from app.ledger.mirror import ensure_provider_entitlement
    from app.models import Balance, Customer

    db = Database(url)
    with db.write() as session:
        ensure_provider_entitlement(session, "cde_bench", "dodo")
        for start in range(0, len(customers), 5000):
            chunk = customers[start : start + 5000]
            session.execute(insert(Customer), [{"id": c, "provider": "dodo", "created_at": utcnow()} for c in chunk])
            session.execute(
                insert(Balance),
                [{"customer_id": c, "entitlement_id": "cde_bench", "balance": 100 * 10**10} for c in chunk],
            )
    db.dispose()


if __name__ == "__main__":
    main()
