"""Where a py-spy profile's time went: samples per layer (leaf frame's package) and the hottest frames.

    .venv/bin/python bench/profile_summary.py bench/profiles/usage-….txt [--top 25]

Reads py-spy's raw (collapsed) output. A sample counts once for the layer of its innermost frame
(self time), and once for every distinct frame on its stack (inclusive time).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

LAYERS = [
    ("sqlalchemy", "SQLAlchemy"),
    ("asyncpg", "asyncpg"),
    ("psycopg", "psycopg"),
    ("aiosqlite", "aiosqlite"),
    ("greenlet", "greenlet"),
    ("uvicorn", "uvicorn"),
    ("httptools", "uvicorn"),
    ("starlette", "Starlette"),
    ("anyio", "anyio / threads"),
    ("threading", "anyio / threads"),
    ("concurrent", "anyio / threads"),
    ("queue.py", "anyio / threads"),
    ("json", "json"),
    ("orjson", "json"),
    ("app/", "Tally"),
    ("decimal", "Tally"),
    ("asyncio", "asyncio / uvloop"),
    ("uvloop", "asyncio / uvloop"),
]
FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


def layer(frame: str) -> str:
    match = FRAME.match(frame)
    where = match.group("file") if match else frame
    for marker, name in LAYERS:
        if marker in where:
            return name
    return "other (" + where.split("/")[0] + ")"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in args.path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[layer(frames[-1])] += count
        for frame in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            inclusive[frame] += count
    print(f"{total} samples; self time by layer:")
    for name, count in own.most_common():
        print(f"  {count / total * 100:5.1f} %  {name}")
    print(f"inclusive time, top {args.top}:")
    for frame, count in inclusive.most_common(args.top):
        print(f"  {count / total * 100:5.1f} %  {frame}")


if __name__ == "__main__":
    main()
