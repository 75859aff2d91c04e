"""The processes of one bench run: scratch database, private Redis, the web and worker processes.

Everything started here is started by this module, in its own process group, and ended by its
process id on every exit path (`Stack.close`, called from a `finally`, also on SIGINT/SIGTERM).
`Sampler` reads /proc every 0.5 s for the resident memory (VmRSS) and CPU time of the web process
and of the worker's process tree (`tally worker` execs dramatiq, which forks its worker process).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, seconds: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


# --- /proc ------------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its children that have ended and been waited for (cutime, cstime):
    summed over the live processes of a tree, every CPU second of the tree counts once, also those of
    short-lived children (PostgreSQL's backends, which come and go with the app's pool)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(value) for value in fields[11:15]) / CLK_TCK


@dataclass
class Series:
    """One role's samples during one phase: (seconds since start, largest process RSS, tree RSS, tree CPU s)."""

    samples: list[tuple[float, float, float, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        largest = [s[1] for s in self.samples]
        first, last = self.samples[0], self.samples[-1]
        half = first[0] + (last[0] - first[0]) / 2
        mid = next(s[1] for s in self.samples if s[0] >= half)
        wall = last[0] - first[0]
        return {
            "rss_start_mb": round(largest[0], 1),
            "rss_max_mb": round(max(largest), 1),
            "rss_mid_mb": round(mid, 1),
            "rss_end_mb": round(largest[-1], 1),
            "tree_rss_max_mb": round(max(s[2] for s in self.samples), 1),
            "samples": len(self.samples),
            "seconds": round(wall, 1),
            "cpu_share": round((last[3] - first[3]) / wall, 3) if wall > 0 else None,
        }


class Sampler(threading.Thread):
    """Samples the RSS and CPU of the registered roles ("web", "worker") while a phase is open."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.roles: dict[str, int] = {}  # role -> root pid, while it runs
        self.lock = threading.Lock()
        self.phase: dict[str, Series] | None = None
        self.phase_started = 0.0
        self.stopped = threading.Event()

    def register(self, role: str, pid: int | None) -> None:
        with self.lock:
            if pid is None:
                self.roles.pop(role, None)
            else:
                self.roles[role] = pid

    def restart(self, role: str) -> None:
        """Forget a role's samples so far in this phase (a process that just booted: its load starts now)."""
        measured = self._measure().get(role)
        with self.lock:
            if self.phase is not None:
                self.phase[role] = Series()
        if measured is not None:
            self._sample({role: measured})

    def _measure(self) -> dict[str, tuple[float, float, float]]:
        with self.lock:
            roles = dict(self.roles)
        measured = {}
        for role, pid in roles.items():
            pids = process_tree(pid)
            rss = [r for r in (rss_mb(p) for p in pids) if r is not None]
            if rss:
                measured[role] = (max(rss), sum(rss), sum(cpu_seconds(p) for p in pids))
        return measured

    def begin(self) -> None:
        measured = self._measure()
        with self.lock:
            self.phase = {role: Series() for role in measured}
            self.phase_started = time.monotonic()
        self._sample(measured)

    def end(self) -> dict[str, dict[str, Any]]:
        self._sample(self._measure())
        with self.lock:
            phase, self.phase = self.phase or {}, None
        return {role: series.summary() for role, series in phase.items()}

    def _sample(self, measured: dict[str, tuple[float, float, float]]) -> None:
        with self.lock:
            if self.phase is None:
                return
            at = time.monotonic() - self.phase_started
            for role, (largest, tree, cpu) in measured.items():
                self.phase.setdefault(role, Series()).samples.append((at, largest, tree, cpu))

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            if self.phase is not None:
                self._sample(self._measure())


# --- the stack --------------------------------------------------------------------------------------


class Stack:
    """One configuration under test: PostgreSQL + private Redis, or the embedded default (SQLite)."""

    def __init__(self, kind: str, workdir: Path, log: Any):
        assert kind in ("postgres", "embedded")
        self.kind, self.log = kind, log
        self.dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
        self.processes: dict[str, subprocess.Popen] = {}
        self.sampler = Sampler()
        self.sampler.start()
        self.database_name: str | None = None
        self.redis_port: int | None = None
        self.web_port = free_port()
        self.env: dict[str, str] = {}
        self.token = ""
        self._engine: Engine | None = None
        self.profile_dir: Path | None = None  # set by --profile
        self.profile_phase: str | None = None
        self.profilers: list[tuple[subprocess.Popen, Path]] = []
        self.profiles: list[Path] = []

    # the stack's parts -----------------------------------------------------------------------------

    def prepare(self, catalogue: Path, secret: str) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TALLY_", "STRIPE_", "DODO_")) and k not in ("DATABASE_URL", "REDIS_URL", "BROKER_URL")
        }
        env.update(
            {
                "TALLY_PLANS": str(catalogue),
                "STRIPE_WEBHOOK_SECRET": secret,
                "PATH": f"{BIN}:{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.kind == "postgres":
            self.database_name = f"tally_bench_{uuid.uuid4().hex[:10]}"
            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", poolclass=NullPool)
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{self.database_name}"'))
            admin.dispose()
            env["DATABASE_URL"] = PG_ADMIN.rsplit("/", 1)[0] + f"/{self.database_name}"
            self.redis_port = free_port()
            self._start(
                "redis",
                [
                    "redis-server",
                    "--port",
                    str(self.redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                ],
            )
            wait_for_port(self.redis_port, 10, self.processes["redis"])
            env["REDIS_URL"] = f"redis://127.0.0.1:{self.redis_port}/0"
        else:
            env["DATABASE_URL"] = f"sqlite:///{self.dir / 'tally.db'}"
        self.env = env
        if self.kind == "postgres":  # CPU only: the database server and this run's Redis
            with self.engine.connect() as connection:  # the postmaster is the parent of this backend
                backend = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
                stat = Path(f"/proc/{backend}/stat").read_text()
            self.sampler.register("postgres", int(stat[stat.rindex(")") + 2 :].split()[1]))
            self.sampler.register("redis", self.processes["redis"].pid)
        self.tally("migrate")
        self.token = self.tally("keys", "create", "--service", "--label", "bench").strip().splitlines()[-1]

    @property
    def database_url(self) -> str:
        return self.env["DATABASE_URL"]

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self.database_url, poolclass=NullPool)
        return self._engine

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """A read of Tally's tables. The PostgreSQL server is shared: when it has no connection to
        spare ("too many clients") this waits for one rather than failing the run."""
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.engine.connect() as connection:
                    return list(connection.execute(text(statement), params))
            except OperationalError as error:
                if "too many clients" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def free_connections(self) -> tuple[int, int]:
        """(connections free for clients like us, max_connections) on the shared PostgreSQL server."""
        limit, reserved, used = self.sql(
            "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int, "
            "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        )[0]
        return limit - reserved - used, limit

    def scalar(self, statement: str, **params: Any) -> Any:
        return self.sql(statement, **params)[0][0]

    def tally(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            [str(BIN / "tally"), *args], env=self.env, cwd=self.dir, capture_output=True, text=True, timeout=600
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"tally {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        self.last_tally = done
        return done.stdout

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        logfile = (self.dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_web(self) -> None:
        process = self._start(
            "web",
            [
                str(BIN / "python"),
                "-m",
                "uvicorn",
                "bench.server:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.web_port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            self.env,
        )
        wait_for_port(self.web_port, 60, process)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/readyz", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sampler.register("web", process.pid)

    def start_worker(self) -> float:
        """Start `tally worker --processes 1 --threads 8`; returns the monotonic time it said it is ready."""
        assert self.kind == "postgres", "the embedded default runs its workers inside the web process"
        log = self.dir / "worker.log"
        offset = log.stat().st_size if log.exists() else 0
        process = self._start("worker", [str(BIN / "tally"), "worker", "--processes", "1", "--threads", "8"], self.env)
        self.sampler.register("worker", process.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"tally worker exited {process.returncode}; see {log}")
            with log.open("rb") as handle:
                handle.seek(offset)
                if b"Worker process is ready for action" in handle.read():
                    ready = time.monotonic()
                    self.sampler.restart("worker")
                    if self.profile_phase:
                        self.start_profile("worker", process.pid)
                    return ready
            time.sleep(0.01)
        raise RuntimeError(f"tally worker did not get ready in 60 s; see {log}")

    def start_profile(self, role: str, pid: int) -> None:
        """py-spy on a process (and its children) until `stop_profiles` or the process ends."""
        assert self.profile_dir is not None and self.profile_phase is not None
        out = self.profile_dir / f"{self.kind}-{self.profile_phase.replace(' ', '_')}-{role}-{len(self.profiles)}.txt"
        spy = subprocess.Popen(
            [
                str(BIN / "py-spy"),
                "record",
                "-f",
                "raw",
                "--nolineno",
                "--subprocesses",
                "--nonblocking",
                "-r",
                "100",
                "-p",
                str(pid),
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "py-spy.log").open("ab"),
            start_new_session=True,
        )
        self.profilers.append((spy, out))
        self.profiles.append(out)

    def start_profiles(self, phase: str) -> None:
        if self.profile_dir is None:
            return
        self.profile_phase = phase
        for role in ("web", "worker"):
            process = self.processes.get(role)
            if process is not None and process.poll() is None:
                self.start_profile(role, process.pid)

    def stop_profiles(self) -> None:
        self.profile_phase = None
        for spy, _ in self.profilers:
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
        for spy, _ in self.profilers:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
        self.profilers = []

    def stop(self, name: str, timeout: float = 30) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        if name in ("web", "worker"):
            self.sampler.register(name, None)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # what it left in its group (dramatiq's fork)
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait(5)

    def close(self, keep: bool = False) -> None:
        self.stop_profiles()
        for name in ("worker", "web", "redis"):
            try:
                self.stop(name, timeout=15)
            except Exception as error:  # keep cleaning up
                self.log(f"  cleanup: stopping {name}: {error}")
        self.sampler.stopped.set()
        if self._engine is not None:
            self._engine.dispose()
        if self.database_name and not keep:
            try:
                admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT", poolclass=NullPool)
                with admin.connect() as connection:
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)'))
                admin.dispose()
            except Exception as error:
                self.log(f"  cleanup: dropping {self.database_name}: {error}")
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
