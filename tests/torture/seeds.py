"""Which seeds a torture test runs, and how a failing one is reported.

- ``SYNAPSE_REPLICATION_TORTURE_SEED=N``: run seed N only (reproduces a failure).
- ``SYNAPSE_REPLICATION_TORTURE_RUNS=K``: run K seeds per test (the default is
  small, for CI).
- ``SYNAPSE_REPLICATION_TORTURE_LONG=1``: soak mode: many more runs, longer
  schedules, and seeds drawn at random (each one is logged and named in any
  failure, so it can be replayed).

Without LONG the seeds are fixed (a per-test base plus the run number), so CI
runs the same schedules every time; what still varies between two runs of one
seed is the interleaving of the reactor, the database threads and the
servers (see docs/reliability.md).
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from typing import Final

from twisted.logger import Logger

SEED_ENV: Final = "SYNAPSE_REPLICATION_TORTURE_SEED"
RUNS_ENV: Final = "SYNAPSE_REPLICATION_TORTURE_RUNS"
LONG_ENV: Final = "SYNAPSE_REPLICATION_TORTURE_LONG"

_log: Final = Logger(namespace="tests.torture")


def long_mode() -> bool:
    """Soak mode is on."""
    return os.environ.get(LONG_ENV, "") not in ("", "0")


def _int_env(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {text!r}") from None


def runs(default: int, long_default: int) -> int:
    """How many seeds a test runs: the env var, else the mode's default."""
    explicit = _int_env(RUNS_ENV)
    if explicit is not None:
        return max(1, explicit)
    return long_default if long_mode() else default


def seeds(base: int, default_runs: int, long_runs: int) -> list[int]:
    """The seeds one test runs (see the module docstring)."""
    only = _int_env(SEED_ENV)
    if only is not None:
        return [only]
    count = runs(default_runs, long_runs)
    if long_mode():
        draw = random.SystemRandom()
        return [draw.randrange(1, 2**31) for _ in range(count)]
    return [base + i for i in range(count)]


def schedule_length(default: int, long_default: int) -> int:
    """Steps in one run's schedule."""
    return long_default if long_mode() else default


class TortureFailure(AssertionError):
    """A run failed; the message names its seed and how to replay it."""


async def run_seeds(
    test_id: str, seed_list: list[int], run: Callable[[int], Awaitable[None]]
) -> None:
    """Run `run(seed)` for each seed, logging each seed first; the first
    failure is re-raised as a `TortureFailure` naming the seed."""
    for index, seed in enumerate(seed_list):
        _log.info(
            "torture {test} run {n}/{total}: seed={seed}",
            test=test_id,
            n=index + 1,
            total=len(seed_list),
            seed=seed,
        )
        try:
            await run(seed)
        except Exception as e:
            raise TortureFailure(
                f"torture seed {seed} failed ({type(e).__name__}: {e}); replay with "
                f"{SEED_ENV}={seed} python -m twisted.trial {test_id}"
            ) from e
