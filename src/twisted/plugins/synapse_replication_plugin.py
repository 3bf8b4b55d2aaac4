# -*- test-case-name: tests.test_serve -*-
"""The twistd plugin: ``twistd -n synapse-replication -c worker.yaml``.

A drop-in of Twisted's plugin system (this directory has no ``__init__.py``
on purpose: ``twisted.plugins`` is Twisted's package and gathers drop-ins
from every ``twisted/plugins`` directory on the path). twistd imports it
whenever it lists its subcommands, so it imports only what parsing the
options needs; the service is built in `makeService`.

The config is read and checked while the options are parsed, so a bad one
is a usage error (twistd prints it and exits 1) before anything starts.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    """``-c/--config FILE`` (required) and ``--log-level LEVEL``."""

    optParameters = [
        ["config", "c", None, "The worker config (YAML) of the instance to run."],
        ["log-level", None, "info", "Log from this level up: debug, info, warn, error."],
    ]

    def postOptions(self) -> None:
        from synapse_replication._logging import parse_log_level
        from synapse_replication.app import check_config
        from synapse_replication.config import load_config
        from synapse_replication.errors import ConfigError

        if not self["config"]:
            raise usage.UsageError("--config (-c) is required: the worker config file")
        try:
            self["log_level_value"] = parse_log_level(self["log-level"])
        except ValueError as e:
            raise usage.UsageError(f"--log-level: {e}") from None
        try:
            config = load_config(self["config"])
            check_config(config)
        except ConfigError as e:
            if e.file is None:
                e = ConfigError(e.key, e.reason, file=self["config"])
            raise usage.UsageError(str(e)) from None
        self["worker_config"] = config


@implementer(IServiceMaker, IPlugin)
class ReplicationServiceMaker:
    tapname = "synapse-replication"
    description = "Synapse's worker replication protocol: run one instance from its worker config."
    options = Options

    def makeService(self, options: Any) -> Any:
        from synapse_replication._logging import twistd_log_observer
        from synapse_replication.app import ReplicationService

        parent = getattr(options, "parent", None)
        observer = twistd_log_observer(
            parent if parent is not None else {}, options["log_level_value"]
        )
        return ReplicationService(options["worker_config"], log_observer=observer)


serviceMaker = ReplicationServiceMaker()
