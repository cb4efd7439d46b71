"""The host allocator for XLA:CPU processes: the demo, the tests, CPU training and benchmarks.

XLA:CPU allocates an executable's temporaries as one buffer per call, on a worker thread: ~160 MiB
for the demo's image-stage train step (64 frames), ~270 MiB for its clip step (8 x 8 frames).
glibc's malloc serves a block that large with a fresh ``mmap`` and unmaps it when it is freed
(a worker thread's arena cannot hold more than 64 MiB, whatever ``M_MMAP_MAX`` says), so every
step faults its temporaries in again, page by page: 42,000-70,000 minor faults and 90-160 ms
of kernel time per step on 2 cores, a fifth to a quarter of the step's CPU time. An allocator
that keeps freed memory mapped (tcmalloc) removes that cost; where none is installed, glibc's
transparent huge pages for malloc (glibc >= 2.35) cut the faults 40x, though the kernel still
zeroes every page (README, "Speed").

Both are chosen through the environment before the process starts (``LD_PRELOAD``,
``GLIBC_TUNABLES``), so launchers apply them to the processes they start; the Makefile does::

    env $(python3 -m vidrd_jax.host_allocator) .venv/bin/python -m vidrd_jax.demo

``VIDRD_HOST_ALLOCATOR=system`` keeps the environment as it is. GPU and TPU runs keep their
tensors in device memory, so this matters only where XLA:CPU computes.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from typing import Callable, Mapping, Optional

TCMALLOC = "libtcmalloc_minimal.so.4"
_TCMALLOC_SETTINGS = {
    # By default tcmalloc hands freed pages back to the kernel at a steady rate, which for
    # buffers that the next step allocates again is the cost we are avoiding (a 64 MiB call
    # still faulted 16 MiB in each time).
    "TCMALLOC_RELEASE_RATE": "0",
    # It prints a line to stderr for every allocation above this (default 1 GiB); full-size
    # CPU runs (benchmarks, memory analyses) make such allocations as a matter of course.
    "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40),
}
_HUGETLB = "glibc.malloc.hugetlb=1"
_OPT_OUT = "VIDRD_HOST_ALLOCATOR"
_FALLBACK_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                  "/usr/lib", "/usr/local/lib")


def find_tcmalloc() -> Optional[str]:
  """Path of an installed tcmalloc (Debian/Ubuntu: ``libtcmalloc-minimal4``), or None."""
  try:
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
  except (OSError, subprocess.SubprocessError):
    listing = ""
  path = tcmalloc_in_ldconfig(listing, bits64=sys.maxsize > 2**32)
  if path:
    return path
  for d in _FALLBACK_DIRS:
    path = os.path.join(d, TCMALLOC)
    if os.path.exists(path):
      return path
  return None


def tcmalloc_in_ldconfig(listing: str, bits64: bool) -> Optional[str]:
  """The tcmalloc of this word size in ``ldconfig -p`` output (that exists on disk), or None."""
  for line in listing.splitlines():
    # "\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    name, _, path = line.strip().partition(" => ")
    # A library of the other word size would only be refused (with a warning) by the loader.
    if name.startswith(TCMALLOC + " ") and ("64" in name) == bits64 and os.path.exists(path):
      return path
  return None


def _glibc_version() -> tuple[int, ...]:
  lib, version = platform.libc_ver()
  if lib != "glibc" or not re.fullmatch(r"\d+\.\d+(\.\d+)?", version or ""):
    return ()
  return tuple(int(p) for p in version.split("."))


def allocator_env(environ: Optional[Mapping[str, str]] = None,
                  tcmalloc: Callable[[], Optional[str]] = find_tcmalloc,
                  glibc: Callable[[], tuple[int, ...]] = _glibc_version) -> dict[str, str]:
  """The variables to set (on top of ``environ``) for an XLA:CPU process.

  Returns an empty dict where there is nothing to do: off Linux, with ``VIDRD_HOST_ALLOCATOR=
  system``, or where the environment already makes a choice (``LD_PRELOAD`` names an allocator,
  ``GLIBC_TUNABLES`` sets ``glibc.malloc.hugetlb``: the user's choice wins). Otherwise tcmalloc if
  it is installed, else glibc's huge-page tunable (glibc >= 2.35), each added to what
  ``LD_PRELOAD`` / ``GLIBC_TUNABLES`` already hold.
  """
  environ = os.environ if environ is None else environ
  if not sys.platform.startswith("linux") or environ.get(_OPT_OUT, "") == "system":
    return {}
  preload = environ.get("LD_PRELOAD", "")
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "malloc" in preload or "glibc.malloc.hugetlb" in tunables:
    return {}
  path = tcmalloc()
  if path:
    return {"LD_PRELOAD": f"{path} {preload}".strip(), **_TCMALLOC_SETTINGS}
  if glibc() < (2, 35):
    return {}
  return {"GLIBC_TUNABLES": f"{tunables}:{_HUGETLB}" if tunables else _HUGETLB}


def describe(environ: Optional[Mapping[str, str]] = None) -> str:
  """The allocator a process with ``environ`` runs with, in a few words, for logs and reports."""
  environ = os.environ if environ is None else environ
  preload = environ.get("LD_PRELOAD", "")
  if "malloc" in preload:
    return f"LD_PRELOAD={preload}"
  if "glibc.malloc.hugetlb=1" in environ.get("GLIBC_TUNABLES", ""):
    return "glibc malloc with transparent huge pages"
  return "glibc malloc"


def main() -> None:
  """Prints the assignments for ``env`` (nothing where there is nothing to change)."""
  print(" ".join(f"{k}={shlex.quote(v)}" for k, v in allocator_env().items()))


if __name__ == "__main__":
  main()
