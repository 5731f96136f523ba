"""A stand-in for Windows' msvcrt on Linux, for tests only: locking() over POSIX record locks, so
that the work dir's lock is really held while the rest of Windows' limits are simulated
(sitecustomize.py)."""

import fcntl
import os

LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2


def locking(fd, mode, nbytes):
    """Windows' byte-range lock from the current position; a held lock raises OSError, as there."""
    operation = fcntl.LOCK_UN if mode == LK_UNLCK else fcntl.LOCK_EX | fcntl.LOCK_NB
    fcntl.lockf(fd, operation, nbytes, os.lseek(fd, 0, os.SEEK_CUR))
