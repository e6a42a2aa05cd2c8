"""Busy processes in seeded on/off bursts: a host that other work slows, on demand.

    python benchmarks/host_load.py --seconds 400 &
    python benchmarks/kv_speed.py --model llama-3.2 --contexts 2048 --bits 8 --prefill 0 \
        --steps 256 --rounds 8

A speed benchmark's method has to rank settings on a machine it shares (the GPU hosts we
lease are shared and drift by tens of percent within a run). This makes such a host out
of a quiet one, so the method can be checked where its answer is known: each of
`--processes` spins for a random 0.2-2 s, sleeps for a random 0.2-2 s, and again, until
`--seconds` have passed. The bursts are seeded: a run's load is the same each time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import time


def burst(seed: int, seconds: float, low: float = 0.2, high: float = 2.0) -> None:
    """Spin and sleep in turn, each for a random time in [low, high], for `seconds`."""
    rng = random.Random(seed)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        spin_until = time.monotonic() + rng.uniform(low, high)
        while time.monotonic() < spin_until:
            pass
        time.sleep(rng.uniform(low, high))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, required=True, help="how long the load lasts")
    parser.add_argument(
        "--processes", type=int, default=multiprocessing.cpu_count(), help="default: one a core"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workers = [
        multiprocessing.Process(target=burst, args=(args.seed + i, args.seconds))
        for i in range(args.processes)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


if __name__ == "__main__":
    main()
