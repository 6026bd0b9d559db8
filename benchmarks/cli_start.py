"""How fast the command line answers: `promptkd --help`, a subcommand's --help and an argument error, against a
bare Python start and against importing torch, in one run (median of N fresh processes each).

    python benchmarks/cli_start.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def seconds(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    python = sys.executable
    promptkd = str(Path(python).parent / "promptkd")
    cases = {
        "python -c pass (baseline)": [python, "-c", "pass"],
        "python -c 'import torch'": [python, "-c", "import torch"],
        "promptkd --help": [promptkd, "--help"],
        "promptkd distill --help": [promptkd, "distill", "--help"],
        "promptkd distill --no-such-flag (argument error)": [promptkd, "distill", "--no-such-flag"],
    }
    base = None
    print("| command | seconds (median) | vs bare python |")
    print("|---|---|---|")
    for name, argv in cases.items():
        took = seconds(argv, args.runs)
        base = base or took
        print(f"| `{name}` | {took:.3f} | {took / base:.1f}x |")


if __name__ == "__main__":
    main()
