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

    env $(.venv/bin/python -m vidrd_jax.host_allocator) .venv/bin/python -m vidrd_jax.demo

``VIDRD_HOST_ALLOCATOR=system`` keeps the environment as it is. GPU and TPU runs keep their
tensors in device memory, so this matters only where XLA:CPU computes.

tcmalloc needs no root: on Debian and Ubuntu ``make install`` runs ``python -m
vidrd_jax.host_allocator --fetch``, which downloads the distribution's own package
(``apt-get download libtcmalloc-minimal4``, ~100 kB) and unpacks its library into the Python
environment (``<sys.prefix>/lib/vidrd_host/``), where :func:`find_tcmalloc` looks after the system.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
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
_DEB_PACKAGE = "libtcmalloc-minimal4"


def environment_lib_dir() -> str:
  """Where ``--fetch`` puts tcmalloc: inside the Python environment, so it goes with it."""
  return os.path.join(sys.prefix, "lib", "vidrd_host")


def find_tcmalloc() -> Optional[str]:
  """Path of tcmalloc: the system's (Debian/Ubuntu: ``libtcmalloc-minimal4``), else the one
  ``--fetch`` put into this Python environment, else None."""
  fetched = os.path.join(environment_lib_dir(), TCMALLOC)
  return _system_tcmalloc() or (fetched if os.path.exists(fetched) else None)


def _system_tcmalloc() -> Optional[str]:
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


def preloads_cleanly(path: str) -> bool:
  """Whether a process starts with ``path`` preloaded (the loader only warns about a bad one)."""
  try:
    run = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LD_PRELOAD": path, **_TCMALLOC_SETTINGS}, check=False)
  except (OSError, subprocess.SubprocessError):
    return False
  return run.returncode == 0 and "LD_PRELOAD" not in run.stderr


def fetch_tcmalloc(dest_dir: Optional[str] = None) -> tuple[Optional[str], str]:
  """Puts tcmalloc into ``dest_dir`` (default: this environment) without root, where apt can.

  Debian and Ubuntu only: ``apt-get download`` fetches the distribution's own build (so it
  matches this libc) as an ordinary user, and ``dpkg-deb -x`` unpacks it anywhere. The library is
  checked by preloading it into a fresh interpreter before it is moved into place. A system
  tcmalloc makes the fetch unnecessary.

  Returns:
    (path, message): the library's path, or None with the reason it is not there.
  """
  dest_dir = environment_lib_dir() if dest_dir is None else dest_dir
  if not sys.platform.startswith("linux"):
    return None, "not Linux: the system allocator is kept"
  system = _system_tcmalloc()
  if system:
    return system, f"using the installed {system}"
  dest = os.path.join(dest_dir, TCMALLOC)
  if os.path.exists(dest) and preloads_cleanly(dest):
    return dest, f"already fetched: {dest}"
  if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
    return None, "no apt-get / dpkg-deb here (install tcmalloc with the system's package manager)"
  with tempfile.TemporaryDirectory() as tmp:
    try:
      # The sandbox option: apt's download user cannot write into a private temp folder.
      subprocess.run(["apt-get", "download", "-o", "APT::Sandbox::User=root", _DEB_PACKAGE],
                     cwd=tmp, capture_output=True, text=True, timeout=180, check=True)
      deb = next(f for f in os.listdir(tmp) if f.endswith(".deb"))
      subprocess.run(["dpkg-deb", "-x", deb, "root"], cwd=tmp, capture_output=True, text=True,
                     timeout=60, check=True)
    except subprocess.CalledProcessError as e:
      why = (e.stderr or "").strip().splitlines()
      return None, f"`{' '.join(e.cmd)}` failed: {why[-1] if why else e.returncode}"
    except (OSError, subprocess.SubprocessError, StopIteration) as e:
      return None, f"could not download {_DEB_PACKAGE}: {e!r}"
    found = [os.path.join(d, TCMALLOC) for d, _, files in os.walk(os.path.join(tmp, "root"))
             if TCMALLOC in files]
    if not found:
      return None, f"{_DEB_PACKAGE}'s package holds no {TCMALLOC}"
    lib = os.path.realpath(found[0])   # the soname is a link to the versioned file
    if not preloads_cleanly(lib):
      return None, f"{deb} does not preload into this Python (another architecture or libc?)"
    os.makedirs(dest_dir, exist_ok=True)
    staged = os.path.join(dest_dir, f".{TCMALLOC}.{os.getpid()}")
    shutil.copyfile(lib, staged)
    os.replace(staged, dest)         # atomic: a concurrent reader never sees half a library
  return dest, f"fetched {deb} into {dest}"


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


def main(argv: Optional[list[str]] = None) -> None:
  """Prints the assignments for ``env`` (nothing where there is nothing to change).

  With ``--fetch`` instead: puts tcmalloc into this environment if it can (see
  :func:`fetch_tcmalloc`) and says what it did on stderr; it never fails an install.
  """
  argv = sys.argv[1:] if argv is None else argv
  if argv not in ([], ["--fetch"]):
    sys.exit(f"usage: python -m vidrd_jax.host_allocator [--fetch]; got {argv}")
  if argv == ["--fetch"]:
    path, message = fetch_tcmalloc()
    fallback = "" if path else "; XLA:CPU runs on glibc's malloc (with huge pages, glibc >= 2.35)"
    print(f"host allocator: {message}{fallback}", file=sys.stderr)
    return
  print(" ".join(f"{k}={shlex.quote(v)}" for k, v in allocator_env().items()))


if __name__ == "__main__":
  main()
