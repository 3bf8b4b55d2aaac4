# -*- test-case-name: tests.test_demo -*-
"""The ``synapse-replication`` command.

Each subcommand is one `Subcommand`: its arguments and one async function of
``(reactor, args)`` returning the exit code, run under
`twisted.internet.task.react`. Adding ``serve`` or ``tail`` is one more entry
in `SUBCOMMANDS`; `main` does the rest (parsing, logging, the reactor, exit
codes, Ctrl-C).

Exit codes: 0 success; 1 the job ran and failed (for ``demo``: a worker did
not receive exactly the writer's rows); 2 bad usage; 3 the job could not be
set up; 130 interrupted (Ctrl-C).

Logging goes to stderr through Twisted's logger, warnings and above unless
``--verbose``: stdout is the command's own output (the demo's table).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from synapse_replication import __version__
from synapse_replication._argtypes import positive_float, positive_int

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_SETUP_FAILED: Final = 3
EXIT_INTERRUPTED: Final = 130

_EPILOG: Final = (
    "exit codes: 0 success, 1 the job failed (demo: a worker did not get every "
    "row), 2 bad usage, 3 could not start, 130 interrupted"
)

RunFunction = Callable[[Any, argparse.Namespace], Coroutine[Any, Any, int]]


@attrs.frozen
class Subcommand:
    """One subcommand: `add_arguments` declares its options and `run` does
    the job in the reactor, returning the exit code. A `summary` of None
    hides it from ``--help`` (internal subcommands, like ``demo-worker``)."""

    name: str
    summary: str | None
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: RunFunction
    # Starts the process's logging from the parsed arguments, for a
    # subcommand with its own logging options; default: `start_logging`
    # with ``--verbose``.
    start_logging: Callable[[argparse.Namespace], None] | None = None


# -- logging


def start_logging(verbose: bool, stream: Any = None) -> None:
    """Twisted's global log to stderr: warnings and above, or info with
    `verbose`. Call once per process."""
    level = LogLevel.info if verbose else LogLevel.warn
    observer = FilteringLogObserver(
        textFileLogObserver(stream or sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=level)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


# -- argument types


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return value


# -- demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration",
        type=positive_float,
        default=10.0,
        metavar="SECONDS",
        help="how long to write (default: %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=positive_float,
        default=2000.0,
        metavar="ROWS",
        help="target rows per second over all streams (default: %(default)g)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        metavar="N",
        help="worker processes to start (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed of the load's choices (default: a new one; event and room "
        "ids are always new, so a run can reuse a --dir)",
    )
    parser.add_argument(
        "--no-disconnect",
        dest="disconnect",
        action="store_false",
        help="do not make the last worker drop its connection halfway through "
        "(by default it does, and catches up from SQLite and over HTTP)",
    )
    parser.add_argument(
        "--dir",
        default=None,
        metavar="DIR",
        help="keep the SQLite database in DIR (default: a temporary directory, removed at the end)",
    )


async def _run_demo(reactor: Any, args: argparse.Namespace) -> int:
    from synapse_replication.demo import DemoOptions, run_demo

    options = DemoOptions(
        duration_s=args.duration,
        rate=args.rate,
        workers=args.workers,
        seed=args.seed,
        directory=args.dir,
        verbose=args.verbose,
        disconnect=args.disconnect,
    )
    return await run_demo(reactor, options)


def _demo_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="this worker's instance name")
    parser.add_argument("--writer-host", default="127.0.0.1")
    parser.add_argument("--writer-port", type=_port, required=True)
    parser.add_argument("--writer-name", default="master")
    parser.add_argument("--server-name", required=True)
    parser.add_argument("--http-port", type=_port, required=True, help="the writer's HTTP catch-up port")
    parser.add_argument("--db", required=True, help="the writer's SQLite file, read-only")


async def _run_demo_worker(reactor: Any, args: argparse.Namespace) -> int:
    from synapse_replication.demo import SECRET_ENV, WorkerOptions, run_worker

    secret = os.environ.get(SECRET_ENV)
    if not secret:
        sys.stderr.write(f"demo-worker: the replication secret must be in ${SECRET_ENV}\n")
        return EXIT_USAGE
    options = WorkerOptions(
        name=args.name,
        writer_host=args.writer_host,
        writer_port=args.writer_port,
        writer_name=args.writer_name,
        server_name=args.server_name,
        http_port=args.http_port,
        db_path=args.db,
        secret=secret,
    )
    return await run_worker(reactor, options)


# -- serve


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from synapse_replication._logging import DEFAULT_LOG_LEVEL, LOG_LEVELS

    parser.add_argument(
        "-c", "--config", required=True, metavar="FILE", help="the worker config (YAML)"
    )
    parser.add_argument(
        "--log-level",
        choices=list(LOG_LEVELS),
        default=DEFAULT_LOG_LEVEL,
        help="log from this level up, to stderr (default: %(default)s; "
        "-v is the same as the default)",
    )


def _serve_logging(args: argparse.Namespace) -> None:
    from synapse_replication._logging import parse_log_level
    from synapse_replication._logging import start_logging as start_service_logging

    start_service_logging(parse_log_level(args.log_level))


async def _run_serve(reactor: Any, args: argparse.Namespace) -> int:
    """Run the instance the config describes until SIGTERM or SIGINT, then
    stop it cleanly. A config error is a usage error (2); failing to start
    (a port in use, the database unreachable) is 3."""
    from twisted.logger import Logger

    from synapse_replication.app import RunningInstance, check_config, start_instance
    from synapse_replication.config import load_config
    from synapse_replication.errors import ConfigError

    log = Logger(namespace="synapse_replication.serve")

    def usage_error(e: ConfigError) -> int:
        if e.file is None:
            e = ConfigError(e.key, e.reason, file=args.config)
        sys.stderr.write(f"synapse-replication serve: {e}\n")
        return EXIT_USAGE

    try:
        config = load_config(args.config)
        check_config(config)
    except ConfigError as e:
        return usage_error(e)
    running: RunningInstance | None = None
    try:
        running = await start_instance(reactor, config)
        # Until the reactor shuts down (SIGTERM, SIGINT), which cancels this.
        await Deferred()
    except CancelledError:
        log.info("Shutting down")
    except ConfigError as e:
        return usage_error(e)
    except Exception as e:
        log.failure("Could not start instance {instance}", instance=config.instance_name)
        sys.stderr.write(
            f"synapse-replication serve: could not start {config.instance_name!r}: {e}\n"
        )
        return EXIT_SETUP_FAILED
    finally:
        if running is not None:
            await running.stop()
    return EXIT_OK


# -- tail


def _tail_arguments(parser: argparse.ArgumentParser) -> None:
    from synapse_replication.tail import add_tail_arguments

    add_tail_arguments(parser)


async def _run_tail(reactor: Any, args: argparse.Namespace) -> int:
    from synapse_replication.tail import run_tail_command

    return await run_tail_command(reactor, args)


SUBCOMMANDS: Final[tuple[Subcommand, ...]] = (
    Subcommand(
        name="demo",
        summary="run a writer and workers under load, and check every worker got every row",
        description=(
            "Start a writer (an SQLite database, replication over TCP on 127.0.0.1) and "
            "worker processes that follow its events, receipts and typing streams; write a "
            "realistic load (rooms, members, messages, state changes, redactions, receipts, "
            "typing) while showing rows/s and each worker's lag per stream; then check that "
            "every worker received exactly the writer's rows."
        ),
        add_arguments=_demo_arguments,
        run=_run_demo,
    ),
    Subcommand(
        name="demo-worker",
        summary=None,
        description=(
            "A worker process of the demo (started by `demo`): follows the writer and "
            "reports on stdout, one JSON object per line. The replication secret comes "
            "from the environment."
        ),
        add_arguments=_demo_worker_arguments,
        run=_run_demo_worker,
    ),
    Subcommand(
        name="serve",
        summary="run one instance (writer, worker or both) from its worker config",
        description=(
            "Start the instance a worker config describes (its database, the streams it "
            "writes and follows, Redis or direct TCP replication, its HTTP and metrics "
            "listeners) and run it until SIGTERM or SIGINT, then stop cleanly: publish what "
            "is owed, tell the others (CLEAR_USER_SYNC), close connections and the "
            "database. Exit codes: 0 stopped cleanly, 2 bad config, 3 could not start."
        ),
        add_arguments=_serve_arguments,
        run=_run_serve,
        start_logging=_serve_logging,
    ),
    Subcommand(
        name="tail",
        summary="show what flows on a replication bus (TCP or Redis), live",
        description=(
            "Attach to a bus and print every command on it: over TCP to one of our writers "
            "(as a client, whose handshake sends REPLICATE), or over Redis to any deployment, "
            "a real Synapse included (SUBSCRIBE only; nothing is published unless "
            "--replicate). One JSON object per line, or an aligned table, or (--stats) rows/s "
            "and tokens per stream and writer; --catch-up-from first shows the rows of a "
            "stream written after a token, fetched from the writer over HTTP. Access tokens "
            "and passwords are never shown. Exit codes: 0 done (--count reached, stdout "
            "closed), 1 --timeout before --count lines, 2 bad usage, 3 could not set up or "
            "catch up, 130 interrupted."
        ),
        add_arguments=_tail_arguments,
        run=_run_tail,
    ),
)


# -- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synapse-replication",
        description="Synapse's worker replication protocol, as a standalone service.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    visible = [c.name for c in SUBCOMMANDS if c.summary is not None]
    subparsers = parser.add_subparsers(
        dest="command", metavar="{" + ",".join(visible) + "}", title="commands"
    )
    for command in SUBCOMMANDS:
        kwargs: dict[str, Any] = {"description": command.description, "epilog": _EPILOG}
        if command.summary is not None:
            # Only subcommands given a help text are listed.
            kwargs["help"] = command.summary
        sub = subparsers.add_parser(command.name, **kwargs)
        sub.add_argument(
            "-v", "--verbose", action="store_true", help="log at info level (to stderr)"
        )
        command.add_arguments(sub)
        sub.set_defaults(subcommand=command)
    return parser


def _react(run: RunFunction, args: argparse.Namespace) -> int:
    """Run `run(reactor, args)` in the reactor; its exit code.

    Ctrl-C (or SIGTERM) stops the reactor; before it stops, the job is
    cancelled so that its own cleanup runs (its ``finally`` blocks: workers
    killed, database closed), and the exit code is 130.
    """
    from twisted.internet import task

    async def main(reactor: Any) -> None:
        job: Deferred[int] = Deferred.fromCoroutine(run(reactor, args))

        def on_shutdown() -> Deferred[None] | None:
            if job.called:
                return None
            # The reactor waits for the job's cleanup before stopping.
            done: Deferred[None] = Deferred()

            def finished(result: object) -> object:
                done.callback(None)
                return result

            job.addBoth(finished)
            job.cancel()
            return done

        reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
        try:
            code = await job
        except (CancelledError, KeyboardInterrupt):
            # KeyboardInterrupt: Ctrl-C before the reactor ran and took over SIGINT.
            code = EXIT_INTERRUPTED
        if code:
            raise SystemExit(code)

    try:
        task.react(main)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILED
    return EXIT_OK  # not reached: react always exits


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: parse `argv`, run the subcommand, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Subcommand | None = getattr(args, "subcommand", None)
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if command.start_logging is not None:
        command.start_logging(args)
    else:
        start_logging(args.verbose)
    try:
        return _react(command.run, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
