# -*- test-case-name: tests -*-
"""Synapse's worker replication protocol as a standalone, typed Twisted library."""

__version__ = "0.1.0"
