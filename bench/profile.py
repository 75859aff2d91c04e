"""`--profile`: py-spy on the web and worker processes during each load phase, and a short summary.

py-spy (`pip install py-spy`, in the `bench` extra) records collapsed stacks (`-f raw`, one
"frame;frame;… count" line per distinct stack, threads that are idle left out) into
bench/results/profiles/; flamegraph.pl or speedscope.app read them as they are. The summary printed
under the tables is, per process and phase, the share of samples that pass through each of Tally's
own functions (inclusive, app/ and workers/ only) and the hottest leaf frames of any code.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*)\)$")


def summarise(path: Path, top: int = 8) -> list[str]:
    if not path.exists() or path.stat().st_size == 0:
        return [f"{path.name}: no samples"]
    inclusive, leaves, total = Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        seen = set()
        for frame in frames:
            match = FRAME.match(frame)
            name = f"{match['function']} ({match['file']})" if match else frame
            if match and match["file"].startswith(("app/", "workers/")) and name not in seen:
                seen.add(name)
                inclusive[name] += count
        leaves[frames[-1]] += count
    if not total:
        return [f"{path.name}: no samples"]
    lines = [f"{path.name}: {total} samples"]
    lines += [f"    {n * 100 / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    lines.append("    hottest leaf frames:")
    lines += [f"    {n * 100 / total:5.1f}%  {name}" for name, n in leaves.most_common(5)]
    return lines
