"""Transparent huge pages for XLA:CPU's large buffers, by re-executing the command once.

XLA:CPU allocates an executable's big buffers (logits, activations of a prefill chunk) afresh on
every call; glibc serves allocations over 32 MB with mmap, and the kernel then faults them in
4 KB at a time, every call. With glibc's `glibc.malloc.hugetlb=1` tunable those mappings are
advised to use 2 MB transparent huge pages: 512x fewer faults. A tunable is read only at process
start, so the command line re-executes itself once with it set (docs/performance.md). Only on
Linux with glibc >= 2.35 and transparent huge pages not disabled; an explicit GLIBC_TUNABLES that
already names the tunable, or SWIFTKV_JAX_NO_HUGEPAGES=1, leaves the process as it is.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "SWIFTKV_JAX_NO_HUGEPAGES"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Linux, glibc >= 2.35 (the tunable's first release) and THP in 'always' or 'madvise' mode."""
    if sys.platform != "linux":
        return False
    name, version = platform.libc_ver()
    try:
        if name != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
            return False
        return "[never]" not in THP_SETTING.read_text()
    except (OSError, ValueError):
        return False


def tuned_environment(env: dict[str, str]) -> dict[str, str] | None:
    """`env` with the huge-page tunable added, or None when it should be left alone."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get(OPT_OUT) == "1" or "glibc.malloc.hugetlb" in tunables:
        return None
    return dict(env, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)


def reexec_with_huge_pages(interpreter_args: Sequence[str]) -> None:
    """Replaces this process by `sys.executable interpreter_args...` with the tunable set; returns
    (doing nothing) where huge pages are unavailable or the environment already decides.

    `interpreter_args` are the interpreter's arguments (`sys.orig_argv[1:]`), not `sys.argv`: under
    `python -m swiftkv_jax.cli` sys.argv[0] is the module's file, which run as a script has no package."""
    env = tuned_environment(dict(os.environ))
    if env is None or not huge_pages_available():
        return
    os.execve(sys.executable, [sys.executable, *interpreter_args], env)
