"""What the benchmark scripts share: the children's line protocol and reactor,
the parent's child processes, and the table of results.

The scripts import it as ``_harness`` (``python benchmarks/X.py`` puts this
folder on sys.path). It never imports `synapse_replication`, and must not:
pipeline_receivers.py imports it in a process that runs Synapse, and the two
packages register prometheus metrics of the same names. What needs our
package is in _events.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred

# --------------------------------------------------------------------------
# In the children


def run_reactor(main: Callable[[Any], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    """Run ``main(reactor)`` in the global reactor; its result, or its exception."""
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    outcome: list[Any] = []

    def start() -> None:
        d = Deferred.fromCoroutine(main(reactor))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise RuntimeError("reactor stopped before the benchmark finished")
    result = outcome[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    assert isinstance(result, dict)
    return result


def say(tag: str, payload: object = None) -> None:
    """A line for the parent: ``TAG`` or ``TAG <json>``."""
    line = tag if payload is None else f"{tag} {json.dumps(payload)}"
    print(line, flush=True)


async def wait_for(reactor: Any, d: Deferred[None], timeout: float, what: str) -> None:
    d.addTimeout(timeout, reactor)
    try:
        await d
    except Exception as e:
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}") from e


# --------------------------------------------------------------------------
# In the parent: the children


@attrs.define
class Env:
    """How a script runs its children: ``PYTHON SCRIPT --child ROLE JSON``,
    under cProfile if `profile_dir` is set, each child's stderr in a log in
    `workdir`.

    `script` gives the script that plays a role. A child that is still running
    after `child_timeout_s` is killed. `close_stdin_on_finish`: `Child.finish`
    closes the child's stdin before waiting for it to exit.
    """

    workdir: Path
    profile_dir: Path | None
    script: Callable[[str], str]
    child_timeout_s: float
    close_stdin_on_finish: bool
    profiles: int = 0

    def command(self, role: str, args: dict[str, Any], python: str | None = None) -> list[str]:
        cmd = [python or sys.executable]
        if self.profile_dir is not None:
            self.profiles += 1
            out = self.profile_dir / f"{self.profiles:03d}-{role}.prof"
            cmd += ["-m", "cProfile", "-o", str(out)]
        return [*cmd, self.script(role), "--child", role, json.dumps(args)]


class Child:
    """A child process talking in lines (see `say`); its stderr goes to a log."""

    def __init__(
        self, env: Env, role: str, args: dict[str, Any], python: str | None = None
    ) -> None:
        self.role = role
        self.log_path = env.workdir / f"child-{role}.log"
        self._close_stdin_on_finish = env.close_stdin_on_finish
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            env.command(role, args, python),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._watchdog = threading.Timer(env.child_timeout_s, self.proc.kill)
        self._watchdog.daemon = True
        self._watchdog.start()

    def expect(self, tag: str) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            name, _, payload = line.rstrip("\n").partition(" ")
            if name == tag:
                return json.loads(payload) if payload else None
        self.proc.wait()
        raise RuntimeError(
            f"{self.role} ended (exit {self.proc.returncode}) before {tag}:\n{self._tail()}"
        )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        if self._close_stdin_on_finish:
            with contextlib.suppress(BrokenPipeError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._watchdog.cancel()
        self._log.close()
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.role} exited {self.proc.returncode}:\n{self._tail()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._watchdog.cancel()
        if not self._log.closed:
            self._log.close()

    def _tail(self) -> str:
        """The last 30 lines of the child's log."""
        if not self._log.closed:  # finish() has closed it
            self._log.flush()
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-30:])


def run_child(env: Env, role: str, args: dict[str, Any], python: str | None = None) -> Any:
    """Start a child, and return what it says with ``RESULT`` once it exited."""
    child = Child(env, role, args, python)
    try:
        result = child.expect("RESULT")
        child.finish()
    finally:
        child.kill()
    return result


def remove_db(path: Path) -> None:
    """An SQLite file and its WAL files, where they exist."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(str(path) + suffix).unlink()


def log(msg: str) -> None:
    """Progress, to stderr: stdout has the results."""
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listened on just now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------
# The table


@attrs.frozen
class Row:
    metric: str
    ours: str
    reference: str
    ratio: str
    target: str
    status: str


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """Half the min-max spread as a percentage of the median, to show how noisy
    a number is."""
    if len(values) < 2:
        return ""
    med = median(values)
    return f" ±{(max(values) - min(values)) / 2 / med * 100:.0f}%" if med else ""


def format_rate(values: Sequence[float]) -> str:
    return f"{median(values):,.0f} rows/s{spread(values)}"


def format_ratio(values: Sequence[float], suffix: str = "", *, range_from: int = 2) -> str:
    """The median of per-run ratios, with their range when there are at least
    `range_from` of them."""
    if len(values) < range_from:
        return f"{median(values):.2f}{suffix}"
    return f"{median(values):.2f}{suffix} ({min(values):.2f}-{max(values):.2f})"


def print_markdown(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, right_align: bool = False
) -> None:
    """A markdown table, its columns as wide as their widest cell; with
    `right_align`, every column but the first is aligned right."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) if right_align else cell.ljust(width)
            for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        return "| " + " | ".join(cells) + " |"

    print(fmt(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(fmt(row))


def print_table(rows: Sequence[Row]) -> None:
    """`rows` under the header metric, ours, reference, ratio, target, status."""
    header = [f.name for f in attrs.fields(Row)]
    print_markdown(header, [attrs.astuple(row) for row in rows])
