"""The torture suite: replication under random schedules of writes and faults.

Its one question: does every reader end up with every row, once, in order,
whatever happens to connections and processes? Each randomized run is built
from a seed (see `tests.torture.seeds`), runs a schedule of writes and faults
against real writers (SQLite, PostgreSQL) and readers (over loopback TCP, in
memory, through Redis), and checks the invariants of `tests.torture.ledger`
after every quiet period and at the end. `test_hostile` feeds readers the
lines known to be hostile to Synapse, and `test_fuzz` fuzzes the row parsers
and the HTTP catch-up endpoint. docs/reliability.md says what is covered.
"""
