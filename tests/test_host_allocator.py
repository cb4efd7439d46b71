"""The host allocator choice (vidrd_jax/host_allocator.py): its rules, and that it removes the faults."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vidrd_jax import host_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(environ, tcmalloc=None, glibc=(2, 36)):
  return host_allocator.allocator_env(environ, tcmalloc=lambda: tcmalloc, glibc=lambda: glibc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD/GLIBC_TUNABLES are Linux's")
def test_allocator_env_prefers_tcmalloc_then_glibc_huge_pages_and_keeps_what_is_set():
  tc = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
  assert _env({}, tcmalloc=tc) == {"LD_PRELOAD": tc, "TCMALLOC_RELEASE_RATE": "0",
                                   "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
  # An existing preload is kept after ours; a preloaded allocator is the user's choice.
  assert _env({"LD_PRELOAD": "/x/libfoo.so"}, tcmalloc=tc)["LD_PRELOAD"] == f"{tc} /x/libfoo.so"
  assert _env({"LD_PRELOAD": "/x/libjemalloc.so.2"}, tcmalloc=tc) == {}
  # No tcmalloc: glibc's tunable, appended to the user's tunables.
  assert _env({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert _env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"}
  assert _env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {}
  assert _env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, tcmalloc=tc) == {}
  assert _env({}, glibc=(2, 31)) == {}          # that glibc has no such tunable
  assert _env({}, glibc=()) == {}               # musl and others
  assert _env({"VIDRD_HOST_ALLOCATOR": "system"}, tcmalloc=tc) == {}


def test_tcmalloc_is_read_from_ldconfig_for_this_word_size(tmp_path):
  lib64, lib32 = tmp_path / "64" / host_allocator.TCMALLOC, tmp_path / "32" / host_allocator.TCMALLOC
  for lib in (lib64, lib32):
    lib.parent.mkdir()
    lib.write_bytes(b"")
  listing = (f"2 libs found in cache `/etc/ld.so.cache'\n"
             f"\tlibtcmalloc_minimal_debug.so.4 (libc6,x86-64) => /nowhere/libtcmalloc_minimal_debug.so.4\n"
             f"\tlibtcmalloc_minimal.so.4 (libc6) => {lib32}\n"
             f"\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => {lib64}\n")
  assert host_allocator.tcmalloc_in_ldconfig(listing, bits64=True) == str(lib64)
  assert host_allocator.tcmalloc_in_ldconfig(listing, bits64=False) == str(lib32)
  assert host_allocator.tcmalloc_in_ldconfig(listing.replace(str(lib64), "/gone.so"), bits64=True) is None


def test_main_prints_assignments_env_can_read():
  out = subprocess.run([sys.executable, "-m", "vidrd_jax.host_allocator"], cwd=ROOT, check=True,
                       capture_output=True, text=True,
                       env={**os.environ, "VIDRD_HOST_ALLOCATOR": ""}).stdout.strip()
  expected = host_allocator.allocator_env({**os.environ, "VIDRD_HOST_ALLOCATOR": ""})
  assert dict(kv.split("=", 1) for kv in out.split()) == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Debian/Ubuntu packages")
def test_fetch_puts_a_tcmalloc_that_preloads_into_the_folder_without_root(tmp_path):
  dest = str(tmp_path / "lib")
  path, message = host_allocator.fetch_tcmalloc(dest)
  if path is None:
    # Not Debian/Ubuntu, or no package index: the message says which, and nothing is left behind.
    assert message and not os.path.exists(os.path.join(dest, host_allocator.TCMALLOC)), message
    pytest.skip(message)
  if message == f"using the installed {path}":   # a system tcmalloc is not copied
    assert not os.path.exists(dest)
    pytest.skip(message)
  assert message.startswith("fetched ") and os.listdir(dest) == [host_allocator.TCMALLOC]
  assert host_allocator.preloads_cleanly(path)
  assert host_allocator.fetch_tcmalloc(dest) == (path, f"already fetched: {path}")


def test_main_refuses_unknown_arguments():
  run = subprocess.run([sys.executable, "-m", "vidrd_jax.host_allocator", "--fecth"], cwd=ROOT,
                       capture_output=True, text=True)
  assert run.returncode != 0 and "--fecth" in run.stderr and not run.stdout


# A jitted call whose buffers are far above glibc's mmap threshold, as a train step's are: the
# minor page faults it costs per call.
_PROBE = textwrap.dedent("""
    import json, os, resource
    import vidrd_jax
    import jax, jax.numpy as jnp
    # [4096, 4096] float32: a 64 MiB result (and temporaries) every call.
    f = jax.jit(lambda x: jnp.exp(x) / jnp.exp(x).sum())
    x = jnp.zeros((4096, 4096), jnp.float32)
    # Warm-up; then the median call, since tcmalloc's heap grows by one more result once in a
    # while early on (when a result is freed only after the next one is allocated).
    f(x).block_until_ready()
    def thp_faults():  # the kernel's huge page faults, machine-wide: granted, and fallen back to 4 KiB
      if not os.path.exists("/proc/vmstat"):
        return {}
      stat = dict(line.split() for line in open("/proc/vmstat"))
      return {k: int(stat.get(k, 0)) for k in ("thp_fault_alloc", "thp_fault_fallback")}
    faults, thp_before = [], thp_faults()
    for _ in range(9):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thp = {k: v - thp_before[k] for k, v in thp_faults().items()}
    print(json.dumps({"faults_per_call": sorted(faults)[4], **thp}))
""")


def _faults_per_call(extra_env):
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
  env.update(extra_env, VIDRD_HOST_ALLOCATOR="", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain_faults():
  return _faults_per_call({})["faults_per_call"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD/GLIBC_TUNABLES are Linux's")
@pytest.mark.parametrize("choice", ["tcmalloc", "glibc huge pages"])
def test_each_choice_stops_xla_faulting_its_buffers_in_on_every_call(choice, plain_faults):
  if choice == "tcmalloc":
    chosen = _env({}, tcmalloc=host_allocator.find_tcmalloc())
    if "LD_PRELOAD" not in chosen:
      pytest.skip("tcmalloc is not installed (Debian/Ubuntu: libtcmalloc-minimal4)")
  else:
    chosen = _env({}, glibc=host_allocator._glibc_version())  # pylint: disable=protected-access
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not chosen or not os.path.exists(thp) or "[never]" in open(thp).read():
      pytest.skip("needs glibc >= 2.35 and transparent huge pages")
  probe = _faults_per_call(chosen)
  tuned = probe["faults_per_call"]
  # glibc alone maps the 64 MiB blocks afresh every call: ~16k faults of 4 KiB each.
  assert plain_faults > 10_000, plain_faults
  if choice == "tcmalloc":
    # tcmalloc keeps the blocks: 0 faults here.
    assert tuned < plain_faults / 10, (chosen, plain_faults, tuned)
    return
  # Huge pages fault the blocks in 2 MiB at a time (~545 faults per call here, a 30x cut), but
  # only where the kernel finds a free 2 MiB run of memory; elsewhere it falls back to 4 KiB
  # pages and counts a fallback (a busy CI runner showed 3099, a 5x cut). What the tunable itself
  # does is ask for huge pages: if it did not, the kernel would neither grant nor refuse any.
  if tuned >= plain_faults / 2 and probe.get("thp_fault_fallback", 0) > 0:
    pytest.skip(f"memory too fragmented for huge pages: {probe}")
  assert tuned < plain_faults / 2, (chosen, plain_faults, probe)
