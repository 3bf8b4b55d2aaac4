#!/usr/bin/env python
"""What this machine charges CPython for handing objects between two threads
on different CPUs: a control for pipeline.py's catch-up, without a database
and without this package.

A catch-up makes its rows in the database thread and delivers them in the
reactor thread. This script does the same with plain Python: a producer
builds pages of 500 fresh rows (a token and a tuple of strings, Nones and
bools, each in its own list, like a page of ``events`` rows) and a consumer
walks each page and drops it. Three ways, interleaved, ``--runs`` times each:

- one thread: the same thread produces and consumes each page;
- two threads: a producer thread hands each page to the main thread through
  a queue and waits for the next request (one hand-over each way per page,
  as a catch-up's page goes to the database thread and back);
- two threads on one CPU: the same, the process pinned to one CPU
  (``os.sched_setaffinity``; Linux only).

Rates are rows per CPU-second of the whole process (all threads). Usage:
``python benchmarks/cross_cpu.py [--runs 5] [--pages 2000]``.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from _harness import Row
from _harness import format_ratio as _ratio
from _harness import median, print_table, spread

PAGE_ROWS = 500

Page = list[tuple[int, list[tuple[Any, ...]]]]


def produce(page: int) -> Page:
    base = page * PAGE_ROWS
    return [
        (
            base + i,
            [(f"$event{base + i}:example.org", f"!room{i % 50}:example.org", "m.room.message",
              None, None, None, None, False, False)],
        )
        for i in range(PAGE_ROWS)
    ]


def consume(page: Page) -> int:
    n = 0
    for _token, rows in page:
        n += len(rows)
    return n


def one_thread(pages: int) -> int:
    n = 0
    for i in range(pages):
        n += consume(produce(i))
    return n


def two_threads(pages: int) -> int:
    requests: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    results: queue.SimpleQueue[Page] = queue.SimpleQueue()

    def producer() -> None:
        while (i := requests.get()) is not None:
            results.put(produce(i))

    thread = threading.Thread(target=producer)
    thread.start()
    n = 0
    try:
        for i in range(pages):
            requests.put(i)
            n += consume(results.get())
    finally:
        requests.put(None)
        thread.join()
    return n


def _rate(values: Sequence[float]) -> str:
    return f"{median(values):,.0f} rows/CPU-s{spread(values)}"


def rate(run: Callable[[int], int], pages: int) -> float:
    start = time.process_time()
    rows = run(pages)
    return rows / (time.process_time() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each way (default 5)")
    parser.add_argument("--pages", type=int, default=2000, help="pages per run (default 2000)")
    ns = parser.parse_args(argv)
    if not hasattr(os, "sched_setaffinity"):
        print("cross_cpu.py: needs os.sched_setaffinity (Linux)", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print(f"cross_cpu.py: this process may use only CPU {cpus}: nothing to compare",
              file=sys.stderr)
        return 2
    print(f"cross_cpu.py: {os.cpu_count()} CPUs, may use {cpus}; Python "
          f"{sys.version.split()[0]}; {ns.runs} runs of {ns.pages} pages of {PAGE_ROWS} rows")
    rates: dict[str, list[float]] = {"one": [], "two": [], "pinned": []}
    for _ in range(ns.runs):
        rates["one"].append(rate(one_thread, ns.pages))
        rates["two"].append(rate(two_threads, ns.pages))
        # Threads inherit the affinity of the thread that starts them.
        os.sched_setaffinity(0, {cpus[-1]})
        try:
            rates["pinned"].append(rate(two_threads, ns.pages))
        finally:
            os.sched_setaffinity(0, set(cpus))

    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(rates[a], rates[b], strict=True)]

    print_table(
        [
            Row("two threads, free vs one thread", _rate(rates["two"]), _rate(rates["one"]),
                _ratio(ratios("two", "one")), "-", "info"),
            Row("two threads, one CPU vs one thread", _rate(rates["pinned"]),
                _rate(rates["one"]), _ratio(ratios("pinned", "one")), "-", "info"),
            Row("two threads: one CPU vs free", _rate(rates["pinned"]), _rate(rates["two"]),
                _ratio(ratios("pinned", "two")), "-", "info"),
        ]
    )
    print(f"\nmedians in rows per CPU-second: one thread {median(rates['one']):,.0f}, "
          f"two threads {median(rates['two']):,.0f}, two threads on one CPU "
          f"{median(rates['pinned']):,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
