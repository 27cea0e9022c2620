"""`make bench`: every benchmark in tools/, one after another, each printing its own table of
ratios against the reference it measures in the same run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
# Cheap and foundational first, so a slow one at the end doesn't hide the rest.
ORDER = ["ops", "roi", "matching", "eval", "data", "ssd"]


def main(names: list[str]) -> int:
    scripts = {p.stem.removeprefix("bench_"): p for p in TOOLS.glob("bench_*.py")}
    chosen = names or [n for n in ORDER if n in scripts] + sorted(set(scripts) - set(ORDER))
    unknown = [n for n in chosen if n not in scripts]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {sorted(scripts)}", file=sys.stderr)
        return 2
    failed = []
    for name in chosen:
        print(f"\n=== bench {name} ({scripts[name].name}) ===", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, str(scripts[name])])
        print(f"--- {name}: {time.perf_counter() - started:.0f} s, exit {code}", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"\nbenchmarks that failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
