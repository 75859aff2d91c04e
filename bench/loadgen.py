"""The load generators and the bare baselines, each run as its own process where it matters.

- `wrk` (Debian's, `-t1`) with bench/lua/bench.lua for saturation figures (P1, P3, P5);
- `python -m bench.httpload` for paced load (P3's paced p99, P4) and exact-count closed loops;
- `pgbench -n -c 64 -j 2` for P5's baseline (`UPDATE … SET v = v + 1` on one row);
- single-row INSERT + COMMIT from one psycopg connection (P2/P2b's baseline), in this process;
- on SQLite (the embedded default, information only) the same two baselines with sqlite3.

Every external client's CPU use is measured (rusage of the waited child) and returned, so the table can
show that the client was not the bottleneck.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

BENCH = Path(__file__).resolve().parent
LUA = BENCH / "lua" / "bench.lua"


def ensure_wrk(log: Any) -> str:
    """wrk from Debian's packages; installed when missing and we are root, else say how."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("bench: wrk is not installed; run `sudo apt-get install -y wrk` (Debian's package) and retry")
    log("installing wrk (apt-get install -y wrk)")
    install = subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, text=True)
    if install.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True)
        install = subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, text=True)
    found = shutil.which("wrk")
    if not found:
        sys.exit(f"bench: could not install wrk: {install.stderr.strip()[-500:]}")
    return found


def run_measured(
    argv: list[str], *, timeout: float, env: dict[str, str] | None = None
) -> tuple[str, str, int, float, float]:
    """Run a client to completion: (stdout, stderr, exit code, its CPU seconds, wall seconds)."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - started
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, done.stderr, done.returncode, cpu, wall


def wrk(url: str, args: list[str], *, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk -t1 round; counts, rate of 2xx answers, latency percentiles (ms) and wrk's CPU share."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(LUA), url, "--", *args]
    stdout, stderr, code, cpu, wall = run_measured(argv, timeout=seconds + 120)
    line = next((out for out in stdout.splitlines() if out.startswith("BENCHJSON ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"wrk failed ({code}): {stderr.strip()[-1000:]} {stdout[-1000:]}")
    result = json.loads(line.removeprefix("BENCHJSON "))
    seconds_run = result["duration_us"] / 1e6
    result.update(
        {
            "seconds": seconds_run,
            "rate": result["s2xx"] / seconds_run if seconds_run else 0.0,
            "p50_ms": result["p50_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000,
            "socket_errors": result["connect_errors"]
            + result["read_errors"]
            + result["write_errors"]
            + result["timeouts"],
            "non_2xx": result["s400"] + result["s4xx"] + result["s5xx"] + result["sother"],
            "client_cpu_share": round(cpu / wall, 3) if wall else None,
        }
    )
    return result


def httpload(spec: dict[str, Any], workdir: Path, name: str, timeout: float) -> dict[str, Any]:
    """bench/httpload.py in its own process (its CPU use is its own report)."""
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(spec))
    stdout, stderr, code, cpu, wall = run_measured([sys.executable, "-m", "bench.httpload", str(path)], timeout=timeout)
    if code != 0:
        raise RuntimeError(f"bench.httpload {name} failed ({code}): {stderr.strip()[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["process_cpu_share"] = round(cpu / wall, 3) if wall else None
    return result


# --- baselines ------------------------------------------------------------------------------------


def bare_inserts_postgres(url: str, seconds: float) -> dict[str, Any]:
    """Single-row INSERT transactions per second from one psycopg connection (a scratch table)."""
    with psycopg.connect(url.replace("+psycopg", "")) as connection:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS bench_bare_inserts "
            "(id BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL)"
        )
        connection.commit()
        return _insert_loop(
            connection, seconds, "INSERT INTO bench_bare_inserts (event_id, created_at) VALUES (%s, now())"
        )


def bare_inserts_sqlite(path: Path, seconds: float) -> dict[str, Any]:
    """The same on a scratch SQLite file with Tally's pragmas (WAL, synchronous=NORMAL)."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(
        "CREATE TABLE IF NOT EXISTS bench_bare_inserts "
        "(id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, created_at TEXT NOT NULL)"
    )

    class Wrapped:  # psycopg-like: execute + commit
        def execute(self, sql: str, params: tuple) -> None:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(sql, params)

        def commit(self) -> None:
            connection.execute("COMMIT")

    try:
        return _insert_loop(
            Wrapped(), seconds, "INSERT INTO bench_bare_inserts (event_id, created_at) VALUES (?, datetime('now'))"
        )
    finally:
        connection.close()


def _insert_loop(connection: Any, seconds: float, sql: str) -> dict[str, Any]:
    count, started = 0, time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        for _ in range(20):
            connection.execute(sql, (f"bare-{count}",))
            connection.commit()
            count += 1
    wall = time.monotonic() - started
    return {"rate": count / wall, "count": count, "seconds": wall}


def pgbench_updates(database: str, seconds: float, clients: int, workdir: Path) -> dict[str, Any]:
    """`pgbench -n -c 64 -j 2 -T N`: `UPDATE bench_counter SET v = v + 1 WHERE id = 1` on one row."""
    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={database}", autocommit=True) as connection:
        connection.execute("CREATE TABLE IF NOT EXISTS bench_counter (id INT PRIMARY KEY, v BIGINT NOT NULL)")
        connection.execute("INSERT INTO bench_counter VALUES (1, 0) ON CONFLICT DO NOTHING")
    script = workdir / "update_one_row.sql"
    script.write_text("UPDATE bench_counter SET v = v + 1 WHERE id = 1;\n")
    argv = [
        "pgbench",
        "-n",
        "-c",
        str(clients),
        "-j",
        "2",
        "-T",
        str(int(seconds)),
        "-f",
        str(script),
        "-h",
        "127.0.0.1",
        "-p",
        "5432",
        "-U",
        "postgres",
        database,
    ]
    stdout, stderr, code, cpu, wall = run_measured(argv, timeout=seconds + 60)
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", stdout)
    if code != 0 or not match:
        raise RuntimeError(f"pgbench failed ({code}): {stderr.strip()[-1000:]}")
    latency = re.search(r"latency average = ([0-9.]+) ms", stdout)
    return {
        "rate": float(match.group(1)),
        "latency_avg_ms": float(latency.group(1)) if latency else None,
        "client_cpu_share": round(cpu / wall, 3) if wall else None,
    }


def sqlite_updates(path: Path, seconds: float, clients: int) -> dict[str, Any]:
    """The embedded default's analogue of the pgbench baseline: 64 threads, one row, one file."""
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE IF NOT EXISTS bench_counter (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
    setup.execute("INSERT OR IGNORE INTO bench_counter VALUES (1, 0)")
    setup.close()
    counts = [0] * clients
    deadline = time.monotonic() + seconds

    def client(n: int) -> None:
        connection = sqlite3.connect(path, isolation_level=None, timeout=30)
        connection.execute("PRAGMA synchronous=NORMAL")
        while time.monotonic() < deadline:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("UPDATE bench_counter SET v = v + 1 WHERE id = 1")
            connection.execute("COMMIT")
            counts[n] += 1
        connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"rate": sum(counts) / (time.monotonic() - started)}
