"""Interoperability tests against a real Synapse, installed from PyPI."""
