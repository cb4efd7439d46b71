"""UNet3D model-FLOPs utilisation: forward, the long-video sampler and a training step, profiled.

Issue 7's accelerator goals in one process: sampling MFU at batch >= 4 and training-step MFU
in bf16, each with a kernel profile that says where the time goes (bench/profile_summary.py),
plus forward variants that test one hypothesis each on the same weights (their outputs are
checked against the default's, so a faster variant is also a correct one).

Model FLOPs are counted on the program as lowered with ``attention_impl="xla"``: the cuDNN
attention and convolution custom calls of the GPU program count as zero in XLA's cost
analysis, so counting on the GPU program would understate the work (and overstate nothing).
Training FLOPs are those of forward + backward without rematerialisation (remat is off here).

Stages run in priority order under ``--budget`` seconds; one that would not fit is skipped
and says so, so a short device lease still returns the most important numbers.

  python -m bench.bench_mfu --device gpu --budget 420 --profile-dir gpu_out/prof
  python -m bench.bench_mfu --device cpu --size small --batch 2 --train-batch 1   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top
from bench import profile_summary  # pylint: disable=g-import-not-at-top

VARIANTS = ("default", "tconv_conv3d", "attn_xla", "no_triton_gemm")
# XLA options per variant (GPU only).
_COMPILER_OPTIONS = {"no_triton_gemm": {"xla_gpu_enable_triton_gemm": False}}


def _extra(p):
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--latent", type=int, default=32)
  p.add_argument("--batch", type=int, default=8, help="UNet batch of the forward (2 x prompts)")
  p.add_argument("--train-batch", type=int, default=4)
  p.add_argument("--sampler-steps", type=int, default=10)
  p.add_argument("--sampler-clips", type=int, default=2)
  p.add_argument("--variants", default="tconv_conv3d,attn_xla,no_triton_gemm",
                 help=f"forward variants besides the default, from {VARIANTS}")
  p.add_argument("--stages", default="forward,profile,train,sampler,variants",
                 help="which stages, in this order of priority")
  p.add_argument("--budget", type=float, default=1e9, help="seconds; later stages that would not fit are skipped")
  p.add_argument("--profile-dir", default="", help="write traces (and the HLO) here")
  p.add_argument("--json", default="", help="write the numbers to this file too")
  p.add_argument("--artifacts", default="", help="tar.gz of the traces and HLO (with --profile-dir)")
  p.add_argument("--count-flops-only", action="store_true", help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------------- variants


def _conv3d_temporal_module():
  """The temporal conv as XLA's 3D convolution (the formulation before layers.TemporalConv)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models import layers  # pylint: disable=g-import-not-at-top

  class Conv3dTemporal(layers.TemporalConv):

    @nn.compact
    def __call__(self, x):
      # Same parameters as TemporalConv (kernel [3, 1, 1, C_in, C_out], bias [C_out]).
      c_in = x.shape[-1]
      kernel = self.param("kernel", nn.initializers.zeros_init(), (3, 1, 1, c_in, self.features),
                          self.param_dtype)
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
      y = jax.lax.conv_general_dilated(
          x.astype(self.dtype), kernel.astype(self.dtype), (1, 1, 1), ((1, 1), (0, 0), (0, 0)),
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
      return y + bias.astype(self.dtype)

  return Conv3dTemporal


@contextlib.contextmanager
def variant(name: str):
  """Applies one forward variant while a program is traced."""
  from vidrd_jax.models import layers  # pylint: disable=g-import-not-at-top
  if name != "tconv_conv3d":
    yield
    return
  original = layers.TemporalConv
  layers.TemporalConv = _conv3d_temporal_module()
  try:
    yield
  finally:
    layers.TemporalConv = original


# ---------------------------------------------------------------------------- the programs


def make_config(args):
  return common.unet3d_config(args)


def forward_fn(model):
  return lambda p, x, t, c: model.apply({"params": p}, x, t, c)


def train_step_fn(model, tx, compute_dtype):
  """One denoising training step: noise at timestep t, epsilon MSE, AdamW on every parameter."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from vidrd_jax.diffusion.schedule import DDIMScheduler  # pylint: disable=g-import-not-at-top
  from vidrd_jax.pipeline import ddim_scheduler_config  # pylint: disable=g-import-not-at-top
  abar_np = np.cumprod(1.0 - DDIMScheduler.from_config(ddim_scheduler_config()).betas())

  def step(p, o, x0, noise, tt, ctx):
    abar = jnp.asarray(abar_np, jnp.float32)

    def loss_fn(p):
      a = abar[tt][:, None, None, None, None]
      xt = (jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise).astype(compute_dtype)
      out = model.apply({"params": p}, xt, tt, ctx)
      return jnp.mean(jnp.square(out.astype(jnp.float32) - noise))

    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  return step


def count_flops(args) -> dict:
  """Model FLOPs of the forward and the training step, from abstract shapes (no weights).

  Lowered with XLA attention and counted by XLA's cost analysis, which the CPU backend has
  and the GPU backend does not (so accelerator runs call this in a CPU subprocess).
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.unet3d import UNet3DConditionModel, init_params  # pylint: disable=g-import-not-at-top
  cfg = make_config(args)
  model = UNet3DConditionModel(dataclasses.replace(cfg, attention_impl="xla"))
  jdt = jnp.dtype(args.jax_dtype)
  p32 = nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), num_frames=2)))
  pc = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jdt), p32)
  sds = jax.ShapeDtypeStruct
  f, s, d = args.frames, args.latent, cfg.cross_attention_dim

  def io(batch, x_dtype):
    return (sds((batch, f, s, s, 4), x_dtype), sds((batch,), jnp.int32), sds((batch, 77, d), jdt))

  out = {}
  x, t, c = io(args.batch, jdt)
  out["forward"] = common.lowered_flops(jax.jit(forward_fn(model)).lower(pc, x, t, c))
  tx = optax.adamw(1e-5, weight_decay=1e-2)
  o = jax.eval_shape(tx.init, p32)
  bt = args.train_batch
  x0 = sds((bt, f, s, s, 4), jnp.float32)
  _, tt, ctx = io(bt, jdt)
  out["train"] = common.lowered_flops(
      jax.jit(train_step_fn(model, tx, jdt)).lower(p32, o, x0, x0, tt, ctx))
  return out


def flops_in_subprocess(args):
  """Starts :func:`count_flops` in a CPU-only child process; returns a function to collect it."""
  import subprocess  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "-m", "bench.bench_mfu", "--device", "cpu", "--count-flops-only",
         "--size", args.size, "--dtype", args.jax_dtype, "--frames", str(args.frames),
         "--latent", str(args.latent), "--batch", str(args.batch), "--train-batch", str(args.train_batch)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.Popen(cmd, cwd=common.REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)

  def collect(timeout: float = 120.0) -> dict:
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      return {}
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
      print(f"FLOP count failed ({proc.returncode}): {err[-2000:]}", flush=True)
      return {}
    return json.loads(lines[-1])

  return collect


# ------------------------------------------------------------------------------------- main


class Budget:
  def __init__(self, seconds: float):
    self.t0, self.seconds = time.perf_counter(), seconds

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.t0)

  def fits(self, estimate: float, what: str, notes: list) -> bool:
    if self.left() >= estimate:
      return True
    msg = f"skipped {what}: {self.left():.0f}s of the budget left, needs about {estimate:.0f}s"
    print(msg, flush=True)
    notes.append(msg)
    return False


def main():
  args = common.parse_args(__doc__.splitlines()[0], extra=_extra)
  if args.count_flops_only:
    print(json.dumps(count_flops(args)), flush=True)
    return
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from vidrd_jax.diffusion import long_video  # pylint: disable=g-import-not-at-top
  from vidrd_jax.diffusion.schedule import DDIMScheduler  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.unet3d import UNet3DConditionModel, init_params  # pylint: disable=g-import-not-at-top
  from vidrd_jax.pipeline import ddim_scheduler_config  # pylint: disable=g-import-not-at-top

  budget = Budget(args.budget)
  # The FLOP count runs beside the device work (minutes of tracing on the host otherwise).
  collect_flops = (lambda timeout=0: count_flops(args)) if args.backend == "cpu" else flops_in_subprocess(args)
  flop_counts = {}

  def flops(kind):
    if not flop_counts:
      flop_counts.update(collect_flops(timeout=max(30.0, budget.left())) or {"none": True})
    return flop_counts.get(kind, float("nan"))

  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:  # before minutes of device work, not after
    raise ValueError(f"unknown variants {unknown}; choose from {VARIANTS}")
  jdt = jnp.dtype(args.jax_dtype)
  cfg = make_config(args)
  model = UNet3DConditionModel(cfg)
  model_xla = UNet3DConditionModel(dataclasses.replace(cfg, attention_impl="xla"))
  peak, peak_src = common.peak_flops(args.jax_dtype)
  results = {"device": common.device_string(), "peak_flops": peak, "peak_source": peak_src,
             "config": dict(block_out_channels=cfg.block_out_channels, frames=args.frames,
                            latent=args.latent, dtype=args.jax_dtype)}
  notes, sections = [], []

  # Random weights straight on the device (speed does not depend on their values).
  t0 = time.perf_counter()
  shapes = nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), num_frames=2)))
  leaves, treedef = jax.tree_util.tree_flatten(shapes)

  sizes = [int(np.prod(s.shape)) for s in leaves]
  offsets = np.cumsum([0] + sizes)
  # Drawn on the host: a jitted draw of a thousand leaves took 209 s to compile on an H200.
  host = np.random.default_rng(0).standard_normal(int(offsets[-1]), dtype=np.float32) * 0.02
  params32 = jax.tree_util.tree_unflatten(
      treedef, [jax.device_put(host[o:o + n].reshape(s.shape)) for o, n, s in zip(offsets, sizes, leaves)])
  del host
  # A copy even in float32: the training stage donates params32.
  params = jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=jdt, copy=True), params32)
  n_params = int(offsets[-1])
  jax.block_until_ready(params)
  print(f"params: {n_params / 1e6:.0f} M in {time.perf_counter() - t0:.1f}s", flush=True)
  results["params_M"] = n_params / 1e6

  rng = np.random.default_rng(0)
  b, f, s = args.batch, args.frames, args.latent

  x = jnp.asarray(rng.standard_normal((b, f, s, s, 4)), jdt)
  c = jnp.asarray(rng.standard_normal((b, 77, cfg.cross_attention_dim)), jdt)
  t = jnp.full((b,), 981, jnp.int32)

  def time_forward(name, m, fn_inputs, label, compiler_options=None):
    t0 = time.perf_counter()
    compiled = jax.jit(forward_fn(m)).lower(params, *fn_inputs).compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - t0
    out = compiled(params, *fn_inputs)
    timing = common.time_fn(lambda: compiled(params, *fn_inputs), warmup=args.warmup, iters=args.iters)
    print(f"{label} {name}: {timing.fmt()} ms, compile {compile_s:.1f}s", flush=True)
    return compiled, out, timing, compile_s

  rows = []
  fwd = None
  flops_fwd = None
  if "forward" in stages:
    compiled, ref_out, timing, compile_s = time_forward("default", model, (x, t, c), f"forward B{b}")
    flops_fwd = flops("forward")
    print(f"forward B{b}: {flops_fwd / 1e12:.3f} TFLOP (lowered, XLA attention)", flush=True)
    fwd = (compiled, ref_out)
    u = flops_fwd / timing.median / peak
    rows.append([f"forward B{b} x F{f} {s}x{s}", "default", timing.fmt(), f"{compile_s:.0f}",
                 f"{flops_fwd / 1e12:.2f}", f"{flops_fwd / timing.median / 1e12:.3g}", f"{100 * u:.1f}%", "-"])
    results["forward"] = dict(batch=b, ms=timing.median * 1e3, tflop=flops_fwd / 1e12, mfu=u,
                              compile_s=compile_s)

  artifacts = []

  def profile(name, fn, calls, compiled):
    if not args.profile_dir:
      return
    tdir = os.path.join(args.profile_dir, name)
    with jax.profiler.trace(tdir):
      for _ in range(calls):
        common._sync(fn())  # pylint: disable=protected-access
    hlo = compiled.as_text()
    hlo_path = os.path.join(args.profile_dir, f"{name}.hlo.txt")
    with open(hlo_path, "w") as fh:
      # Without source metadata: a third of the size, and the op names stay.
      fh.write(re.sub(r", metadata=\{[^}]*\}", "", hlo))
    module = hlo.split(",", 1)[0].replace("HloModule ", "").strip()
    xplane = profile_summary.latest_xplane(tdir)
    artifacts.extend([hlo_path, xplane])
    try:
      summ = profile_summary.summarise(xplane, profile_summary.parse_hlo(hlo), module=module,
                                       calls=calls, top=15)
    except Exception as e:  # pylint: disable=broad-except
      notes.append(f"profile of {name} could not be summarised: {e!r}")
      print(notes[-1], flush=True)
      return
    md = profile_summary.markdown(summ, f"Profile: {name}")
    print(md, flush=True)
    sections.append(md)
    results.setdefault("profiles", {})[name] = summ

  if "profile" in stages and fwd is not None and budget.fits(20, "forward profile", notes):
    profile(f"forward_B{b}", lambda: fwd[0](params, x, t, c), 3, fwd[0])

  # ------------------------------------------------------------------------ training step
  bt = args.train_batch
  if "train" in stages and budget.fits(150 if args.size == "full" else 30, "training step", notes):
    tx = optax.adamw(1e-5, weight_decay=1e-2)
    opt_state = jax.jit(tx.init)(params32)
    x0 = jnp.asarray(rng.standard_normal((bt, f, s, s, 4)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((bt, f, s, s, 4)), jnp.float32)
    tt = jnp.asarray(rng.integers(0, 1000, bt), jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((bt, 77, cfg.cross_attention_dim)), jdt)
    step = jax.jit(train_step_fn(model, tx, jdt), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    cstep = step.lower(params32, opt_state, x0, noise, tt, ctx).compile()
    compile_s = time.perf_counter() - t0
    state = [params32, opt_state]

    def run_step():
      state[0], state[1], loss = cstep(state[0], state[1], x0, noise, tt, ctx)
      return loss

    with common.PeakMemory() as mem:
      timing = common.time_fn(run_step, warmup=args.warmup, iters=args.iters)
    loss = float(run_step())
    flops_tr = flops("train")
    u = flops_tr / timing.median / peak
    print(f"train B{bt}: {timing.fmt()} ms, compile {compile_s:.1f}s, {flops_tr / 1e12:.2f} TFLOP, "
          f"MFU {100 * u:.1f}%, loss {loss:.4f}, peak {common.fmt_bytes(mem.peak)}", flush=True)
    rows.append([f"train step B{bt} x F{f} {s}x{s} (AdamW, f32 master, no remat)", "default",
                 timing.fmt(), f"{compile_s:.0f}", f"{flops_tr / 1e12:.2f}",
                 f"{flops_tr / timing.median / 1e12:.3g}", f"{100 * u:.1f}%", "-"])
    results["train"] = dict(batch=bt, ms=timing.median * 1e3, tflop=flops_tr / 1e12, mfu=u,
                            compile_s=compile_s, loss=loss, peak_bytes=mem.peak)
    if "profile" in stages and budget.fits(20, "training profile", notes):
      profile(f"train_B{bt}", run_step, 2, cstep)
    del state, cstep, opt_state
    params32 = None  # donated

  # ------------------------------------------------------------------- long-video sampler
  if ("sampler" in stages and flops_fwd is not None
      and budget.fits(90 if args.size == "full" else 30, "sampler", notes)):
    prompts = b // 2
    sched = DDIMScheduler.from_config(ddim_scheduler_config())
    ctx = jnp.asarray(rng.standard_normal((prompts, 77, cfg.cross_attention_dim)), jnp.float32)
    neg = jnp.asarray(rng.standard_normal((prompts, 77, cfg.cross_attention_dim)), jnp.float32)
    k, steps = args.sampler_clips, args.sampler_steps
    run = lambda: long_video.sample_long_video(
        long_video.UNetDenoiser(model), params, sched, ctx, neg, latent_shape=(s, s, 4),
        num_clips=k, frames_per_clip=f, overlap=f // 2, num_steps=steps, guidance_scale=10.0,
        progress_every=0, dtype=jnp.float32).latents
    t0 = time.perf_counter()
    common._sync(run())  # pylint: disable=protected-access
    cold = time.perf_counter() - t0
    timing = common.time_fn(run, warmup=0, iters=max(2, args.iters // 3))
    per_step = timing.median / (k * steps)
    u = flops_fwd / per_step / peak
    overhead = per_step / results["forward"]["ms"] * 1e3
    print(f"sampler {prompts} prompts x {k} clips x {steps} steps: {timing.fmt()} ms, "
          f"{per_step * 1e3:.1f} ms/step, MFU {100 * u:.1f}%, overhead vs bare UNet {overhead:.3f}",
          flush=True)
    rows.append([f"long-video sampler, {prompts} prompts (UNet batch {b}), {k} clips x {steps} steps",
                 "default", f"{per_step * 1e3:.1f} per step", f"{cold - timing.median:.0f}",
                 f"{flops_fwd / 1e12:.2f} / step", f"{flops_fwd / per_step / 1e12:.3g}",
                 f"{100 * u:.1f}%", f"step / bare UNet = {overhead:.3f}"])
    results["sampler"] = dict(prompts=prompts, ms_per_step=per_step * 1e3, mfu=u, overhead=overhead,
                              first_call_s=cold)

  # -------------------------------------------------------------------- forward variants
  if "variants" in stages and fwd is not None:
    for name in variants:
      if not budget.fits(70 if args.size == "full" else 20, f"variant {name}", notes):
        continue
      options = _COMPILER_OPTIONS.get(name)
      if options and args.backend != "gpu":
        notes.append(f"variant {name}: GPU-only XLA options, skipped on {args.backend}")
        continue
      m = UNet3DConditionModel(cfg) if name != "attn_xla" else model_xla
      with variant(name):
        _, out, timing, compile_s = time_forward(name, m, (x, t, c), f"forward B{b}", options)
      ref = np.asarray(fwd[1], np.float32)
      err = float(np.abs(np.asarray(out, np.float32) - ref).max() / ref.std())
      u = flops_fwd / timing.median / peak
      rows.append([f"forward B{b} x F{f} {s}x{s}", name, timing.fmt(), f"{compile_s:.0f}",
                   f"{flops_fwd / 1e12:.2f}", f"{flops_fwd / timing.median / 1e12:.3g}",
                   f"{100 * u:.1f}%", f"max diff vs default / std = {err:.1e}"])
      results.setdefault("variants", {})[name] = dict(ms=timing.median * 1e3, mfu=u, err=err)

  # --------------------------------------------------------------------------- report
  header = ["program", "variant", "ms (median, min)", "compile s", "model TFLOP", "TFLOP/s",
            "MFU", "note"]
  body = (f"SD2.1-base UNet3D with VidRD's temporal layers, {n_params / 1e6:.0f} M params "
          f"(random weights), {args.jax_dtype} compute; median of {args.iters} after {args.warmup} "
          f"warm-up. Model FLOPs counted on the lowered program with XLA attention (the GPU "
          f"program's cuDNN calls count as zero in XLA's cost analysis). Peak {peak / 1e12:.3g} "
          f"TFLOP/s ({peak_src}). Variants: tconv_conv3d = the (3,1,1) temporal convs as XLA 3D "
          f"convolutions (before layers.TemporalConv's single matmul); attn_xla = every attention on XLA (no cuDNN flash); no_triton_gemm = XLA "
          f"option xla_gpu_enable_triton_gemm=false (cuBLAS for every matmul).\n\n"
          + common.markdown_table(header, rows)
          + ("\n\n" + "\n\n".join(sections) if sections else "")
          + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else ""))
  common.append_section(f"UNet3D MFU and profile ({args.backend}, {args.size})", body, args)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=1, default=str)
  if args.artifacts and artifacts:
    tar = args.artifacts
    for keep in (artifacts, [a for a in artifacts if a.endswith(".hlo.txt")]):
      with tarfile.open(tar, "w:gz") as tf:
        for a in keep:
          tf.add(a, arcname=os.path.relpath(a, args.profile_dir))
      if os.path.getsize(tar) < 15 * 2**20:  # what a device lease can bring back
        break
    print(f"traces and HLO: {os.path.abspath(tar)} ({os.path.getsize(tar) / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()
