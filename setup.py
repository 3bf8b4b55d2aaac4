import os

from setuptools import Extension, setup

# All metadata lives in setup.cfg; this file exists for tools that still call it,
# and for the optional C speed-ups of the wire codec. `optional=True`: if the
# extension cannot be built (no compiler, no Python headers), setuptools warns
# and installs the package without it; the pure-Python code then does the same
# work, more slowly. SYNAPSE_REPLICATION_NO_EXTENSIONS=1 skips the build.
ext_modules = []
if not os.environ.get("SYNAPSE_REPLICATION_NO_EXTENSIONS"):
    ext_modules.append(
        Extension(
            "synapse_replication._speedups",
            ["src/synapse_replication/_speedups.c"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
