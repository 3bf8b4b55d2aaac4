# -*- test-case-name: tests.test_examples -*-
"""The README's example runs and does what the README says."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ExchangeExampleTests(TestCase):
    def test_server_and_client_exchange_commands(self) -> None:
        """examples/exchange.py: the client receives the server's POSITION and RDATA."""
        result = subprocess.run(
            [sys.executable, os.path.join(_ROOT, "examples", "exchange.py")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(
            "PositionCommand(stream_name='typing', instance_name='master', "
            "prev_token=0, new_token=0)",
            result.stdout,
        )
        self.assertIn("token=1, row=['!room:x', ['@alice:x']]", result.stdout)
