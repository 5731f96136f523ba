"""Makes this Linux interpreter lack what Windows lacks, for tests/test_portability.py: no fcntl
(msvcrt.py stands in for Windows' own lock), no SIGUSR1/SIGUSR2, no symbolic links for an
ordinary user, no os.fchmod, no fork or forkserver. Python imports it at start when this folder
is on PYTHONPATH."""

import multiprocessing
import multiprocessing.connection  # noqa: F401  (these probe msvcrt to tell Windows: imported before it is there)
import os
import pathlib
import signal
import subprocess  # noqa: F401
import sys

import msvcrt_stand_in  # imports the real fcntl before it is hidden

sys.modules["msvcrt"] = msvcrt_stand_in
sys.modules["fcntl"] = None  # `import fcntl` now raises ImportError, as on Windows
for name in ("SIGUSR1", "SIGUSR2"):
    delattr(signal, name)
del os.fchmod


def no_symlinks(*args, **kwargs):
    raise OSError(1314, "A required privilege is not held by the client")


os.symlink = no_symlinks
pathlib.Path.symlink_to = no_symlinks
multiprocessing.get_all_start_methods = lambda: ["spawn"]
