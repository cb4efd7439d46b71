"""Checks the CPU demo against its goals (issue 6) and records the numbers in BENCHMARKS.md.

    python bench/bench_demo.py                      # runs `python -m vidrd_jax.demo --out=demo_out`
    python bench/bench_demo.py --metrics=demo_out/metrics.json   # checks an existing run only

Goals: caption following on held-out caption combinations, for colour, shape and direction,
>= chance + 0.6 x (1 - chance); boundary ratio with FNR + PNS + DSG <= 1.5 and clearly below
(<= 0.8 x) independent clips; end to end <= 15 minutes on 2 cores; peak memory < 8 GiB.

Time and memory are measured here around the demo process (wall clock, and the peak resident
set size of the process tree from ``getrusage(RUSAGE_CHILDREN)``); the demo's own figures are used
when only ``--metrics`` is given. Exit status 0 when every goal passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from vidrd_jax import host_allocator  # noqa: E402
from vidrd_jax.eval import metrics as metrics_lib  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="demo_out", help="the demo's output folder")
  p.add_argument("--metrics", default=None, help="check this metrics.json instead of running")
  p.add_argument("--quick", action="store_true", help="run the demo with --quick (smoke run)")
  p.add_argument("--fresh", action="store_true", help="run the demo with --fresh (retrain)")
  p.add_argument("--no-append", action="store_true", help="print only; do not touch BENCHMARKS.md")
  p.add_argument("--note", default="")
  args = p.parse_args(argv)

  if args.metrics is None:
    cmd = [sys.executable, "-m", "vidrd_jax.demo", f"--out={args.out}"]
    cmd += ["--quick"] * args.quick + ["--fresh"] * args.fresh
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    # The demo as `make demo` runs it, with the host allocator that suits XLA:CPU (the report's
    # header names it).
    os.environ.update(host_allocator.allocator_env())
    rc = subprocess.call(cmd, cwd=common.REPO_ROOT)
    wall = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux: the largest resident set among the waited-for descendants.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if rc != 0:
      print(f"demo failed with exit status {rc}")
      return rc
    path = os.path.join(common.REPO_ROOT, args.out, "metrics.json")
  else:
    path, wall, peak = args.metrics, None, None
  with open(path) as f:
    result = json.load(f)
  if wall is not None:
    result["timing"]["total_s"] = wall
    result["memory"]["peak_rss_bytes"] = max(peak, result["memory"].get("peak_rss_bytes", 0))

  goals = metrics_lib.demo_goals(result)
  report = metrics_lib.format_goals(goals)
  print(report)
  passed = all(g["passed"] for g in goals)
  following = result["caption_following"]
  rows = []
  for a in metrics_lib.ATTRIBUTES:
    rows.append([f"caption following: {a}", f"{following['vidrd']['accuracy'][a]:.3f}",
                 f"{following['independent']['accuracy'][a]:.3f}",
                 f"{following['vidrd']['chance'][a]:.3f}",
                 f"{metrics_lib.goal(following['vidrd']['chance'][a]):.3f}",
                 f"{result['detector_on_real']['accuracy'][a]:.3f}"])
  table = common.markdown_table(
      ["metric", "VidRD", "independent clips", "chance", "goal", "detector on real clips"], rows)
  boundary = result["boundary"]
  body = "\n".join([
      f"Demo run: `{result.get('command', 'python -m vidrd_jax.demo')}`; "
      f"{result.get('num_videos', '?')} held-out prompts x 4 clips.",
      "",
      table,
      "",
      f"- boundary ratio (change across clip seams / inside clips): VidRD "
      f"{boundary['vidrd']['ratio']:.3f}, independent clips {boundary['independent']['ratio']:.3f}, "
      f"real synthetic videos {boundary.get('real', {}).get('ratio', float('nan')):.3f}",
      f"- wall time {result['timing']['total_s']:.0f} s "
      f"(stages: {', '.join(f'{k} {v:.0f} s' for k, v in result['timing'].items() if k != 'total_s')})",
      f"- peak memory {result['memory']['peak_rss_bytes'] / 2**30:.2f} GiB",
      # With other jobs on the cores, wall time overstates the demo's own cost.
      f"- CPU time {result.get('cpu_s', float('nan')):.0f} s (all threads of the demo process; "
      f"about half of it is the wall time on two free cores)",
      f"- training: {result.get('training', {}).get('steps', '?')} steps, "
      f"{result.get('training', {}).get('prediction_type', 'unrecorded')} prediction",
      "",
      "Goals:",
      "",
      "```",
      report,
      "```",
  ])
  common.append_section("CPU demo goals (bench_demo.py)", body, args)
  print("ALL GOALS PASS" if passed else "SOME GOALS MISSED")
  return 0 if passed else 1


if __name__ == "__main__":
  sys.exit(main())
