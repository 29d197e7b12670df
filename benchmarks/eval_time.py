"""Wall time of ``ctxmix eval`` with no arguments against the run it replaced, side by side.

The default run mixes with ``cm`` (full distributions); before it, the default was ``-m none -m hedge``
(p(target) only). Both commands run as a user runs them (a new process each: imports, model load, JIT cache
reads included), alternately, ``--repeats`` times; the table gives the medians and their ratio.

    python benchmarks/eval_time.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "before (-m none -m hedge)": [sys.executable, "-m", "ctxmix", "eval", "--quiet", "-m", "none", "-m", "hedge"],
    "default (none, cm)": [sys.executable, "-m", "ctxmix", "eval", "--quiet"],
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
          f"python {platform.python_version()}")
    for command in COMMANDS.values():  # warm the JIT cache and the page cache once, untimed
        subprocess.run(command, check=True, capture_output=True)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    before, after = medians.values()
    for name, values in times.items():
        print(f"{name:28s} median {medians[name]:6.2f} s   runs: {', '.join(f'{v:.2f}' for v in values)}")
    print(f"ratio default / before: {after / before:.3f}")
    return {"seconds": times, "medians": medians, "ratio": after / before}


if __name__ == "__main__":
    main()
