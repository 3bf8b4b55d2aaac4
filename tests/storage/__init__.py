"""Tests for synapse_replication.storage."""
