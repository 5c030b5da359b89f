"""Processes tied to their parent: Linux sends them a signal when the process that started them dies."""

import ctypes
import os
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def request_parent_death_signal(signal_number: int) -> None:
    """Ask Linux to send ``signal_number`` to this process when its parent dies.

    Raises OSError where that is unavailable (not Linux, or prctl refused).
    """
    if not sys.platform.startswith("linux"):
        raise OSError(f"PR_SET_PDEATHSIG needs Linux, not {sys.platform}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")
