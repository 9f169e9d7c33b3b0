"""The console script re-executes itself with glibc's huge-page tunable: the environment is built
right, and in the re-executed process a large malloc really is backed by huge pages."""

import subprocess
import sys

import pytest

from swiftkv_jax.cli import hugepages

# Mallocs 64 MB with glibc's own malloc, touches it, and prints the process's huge-page bytes.
PROBE = """
import ctypes, os
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(64 << 20)
ctypes.memset(p, 1, 64 << 20)
kb = [int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")]
print(os.environ.get("GLIBC_TUNABLES"), kb[0] if kb else 0)
"""


def test_tuned_environment_adds_appends_and_respects_the_user():
    assert hugepages.tuned_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    mixed = hugepages.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert mixed["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepages.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert hugepages.tuned_environment({hugepages.OPT_OUT: "1"}) is None


def _run(code: str, **env) -> list[str]:
    import os
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in dict(os.environ, **env).items() if v is not None})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not hugepages.huge_pages_available(), reason="no glibc >= 2.35 with THP here")
def test_reexecuted_process_backs_large_mallocs_with_huge_pages():
    reexec = ("from swiftkv_jax.cli.hugepages import reexec_with_huge_pages\n"
              f"reexec_with_huge_pages(['-c', {PROBE!r}])\nprint('not re-executed')")
    tunables, huge_kb = _run(reexec, GLIBC_TUNABLES=None, **{hugepages.OPT_OUT: None})
    assert tunables == "glibc.malloc.hugetlb=1" and int(huge_kb) >= 32 << 10
    # Without the tunable (THP in madvise mode) the same malloc gets no huge pages.
    plain = _run(PROBE, GLIBC_TUNABLES=None)
    if "[madvise]" in hugepages.THP_SETTING.read_text():
        assert plain[0] == "None" and int(plain[1]) == 0


def test_module_entry_point_survives_the_reexecution():
    """`python -m swiftkv_jax.cli` (how servers are started) re-executes as a module, not as the
    file cli/__init__.py (which, run as a script, has no package for its relative imports)."""
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
    out = subprocess.run([sys.executable, "-m", "swiftkv_jax.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0 and "--port" in out.stdout, out.stderr


def test_the_command_line_starts_without_jax():
    """The console script imports `swiftkv_jax.cli` before it re-executes itself: neither that nor
    `import swiftkv_jax` may import JAX (the public names load on first use), or every command
    pays for JAX's import twice."""
    code = ("import sys, swiftkv_jax, swiftkv_jax.cli\n"
            "assert 'jax' not in sys.modules, 'jax imported'\n"
            "assert callable(swiftkv_jax.generate) and 'jax' in sys.modules\n"
            "import swiftkv_jax.runtime.generation\n"
            "assert callable(swiftkv_jax.generate), 'the module shadows the function'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
