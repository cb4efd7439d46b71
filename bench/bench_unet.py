"""UNet3D forward and forward+backward: ours (Flax) vs the PyTorch reference, same weights.

The PyTorch side is diffusers' UNet2DConditionModel with VidRD's temporal layers
(tests/torch_reference/unet3d.py), randomised with a seed; its state dict is converted with
weight_conversion.unet.unet_from_torch, so both run the same weights on the same device in
the same process, interleaved (torch, ours, torch, ours ...) so that load drifts hit both.

Shapes:
  --size full : SD2.1-base + VidRD temporal layers (1.18 B parameters), batch 2 (CFG) x 8 frames
                x 32x32 latents (256 px), bf16 (ours) / fp16 (torch) on GPU.
  --size small: the same block layout with 2/5 of the channels
                (128, 256, 512, 512; 2/4/8/8 heads of 64), batch 2 x 4 frames x 32x32 latents, float32:
                what a 2-core CPU runs in a minute or two. The 4096-token spatial attention of
                the first level is kept, since it dominates on CPU.
  training shape (--train): batch 1 x 8 frames (full) / 1 x 4 frames (small), loss = mean
                squared output, gradients w.r.t. every parameter (ours: jax.grad; torch: backward).

  python -m bench.bench_unet                        # CPU, small
  python -m bench.bench_unet --device gpu           # H100/A100: full size
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top


def _extra(p):
  p.add_argument("--frames", type=int, default=None)
  p.add_argument("--batch", type=int, default=2, help="inference batch (2 = one video with CFG)")
  p.add_argument("--latent", type=int, default=32, help="latent height = width")
  p.add_argument("--channels", default=None, help="comma-separated block_out_channels override")
  p.add_argument("--train-batch", type=int, default=1, help="batch of the forward+backward pass")
  p.add_argument("--no-train", action="store_true", help="skip forward+backward")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
  p.add_argument("--attention", default=None, help="attention_impl for ours (default: auto)")
  p.add_argument("--profile", default="", help="write a jax.profiler trace of ours to this folder")
  p.add_argument("--hlo-ops", type=int, default=0,
                 help="print the N most expensive HLO instructions (XLA cost analysis)")


def make_config(args):
  """(UNet3DConfig for ours, frames)."""
  cfg = common.unet3d_config(args, args.channels, attention_impl=args.attention)
  frames = args.frames or (8 if args.size == "full" else 4)
  return cfg, frames


def build_models(cfg, args, seed: int = 0):
  """(torch reference module, our Flax params) with identical weights."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  torch = common.setup_torch(args)
  from tests.torch_reference.unet3d import build_reference_unet3d  # pylint: disable=g-import-not-at-top
  from weight_conversion.unet import unet_from_torch  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  ref = build_reference_unet3d(cfg.to_diffusers(), seed=seed)
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  params = unet_from_torch(sd, cfg)
  n_params = sum(int(np.prod(v.shape)) for v in sd.values())
  print(f"built both models ({n_params / 1e6:.1f} M params) in {time.perf_counter() - t0:.1f}s",
        flush=True)
  return ref, params, n_params


def torch_dtype(torch, name):
  return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def main():
  args = common.parse_args(__doc__.splitlines()[0], extra=_extra)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.unet3d import UNet3DConditionModel  # pylint: disable=g-import-not-at-top

  cfg, frames = make_config(args)
  ref, params_np, n_params = build_models(cfg, args)
  torch = sys.modules["torch"]
  tdev = common.torch_device(args)
  tdt = torch_dtype(torch, args.torch_dtype)
  ref = ref.to(device=tdev, dtype=tdt)
  model = UNet3DConditionModel(cfg)
  jdt = jnp.dtype(args.jax_dtype)
  # Inference keeps weights in the compute dtype (half the bytes to read on accelerators);
  # training keeps float32 master weights and computes in cfg.dtype.
  params_infer = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jdt), params_np)
  params_train = (params_infer if jdt == jnp.float32
                  else jax.tree_util.tree_map(jnp.asarray, params_np))
  del params_np

  b, f, s = args.batch, frames, args.latent
  rng = np.random.default_rng(0)
  lat = rng.standard_normal((b, f, s, s, 4)).astype(np.float32)
  ctx = rng.standard_normal((b, 77, cfg.cross_attention_dim)).astype(np.float32)
  tsteps = np.array([981, 981][:b] + [981] * max(0, b - 2), np.int32)
  j_lat, j_ctx, j_t = jnp.asarray(lat, jdt), jnp.asarray(ctx, jdt), jnp.asarray(tsteps)
  t_lat = torch.from_numpy(np.ascontiguousarray(lat.transpose(0, 4, 1, 2, 3))).to(tdev, tdt)
  t_ctx = torch.from_numpy(ctx).to(tdev, tdt)
  t_t = torch.from_numpy(tsteps.astype(np.int64)).to(tdev)

  peak, peak_src = common.peak_flops(args.jax_dtype)
  rows, notes = [], []

  # ---------------------------------------------------------------- forward (inference shape)
  fwd = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  lower_s, compile_s, compiled, flops = common.compile_time(fwd, params_infer, j_lat, j_t, j_ctx)
  ours_out = np.asarray(compiled(params_infer, j_lat, j_t, j_ctx), np.float32)
  with torch.no_grad():
    ref_out = ref(t_lat, t_t, t_ctx).float().cpu().numpy().transpose(0, 2, 3, 4, 1)
  err = float(np.abs(ours_out - ref_out).max() / ref_out.std())
  print(f"forward: trace+lower {lower_s:.1f}s compile {compile_s:.1f}s, {flops / 1e12:.3f} TFLOP, "
        f"max|ours-torch|/std = {err:.2e}", flush=True)

  def torch_fwd():
    with torch.no_grad():
      return ref(t_lat, t_t, t_ctx)

  t_ours, t_torch = _interleaved(
      lambda: compiled(params_infer, j_lat, j_t, j_ctx), torch_fwd if not args.no_torch else None,
      args)
  rows.append(_row(f"forward B{b} F{f} {s}x{s}", t_ours, t_torch, flops, peak, compile_s + lower_s))

  if args.hlo_ops:
    notes.append(_hlo_breakdown(compiled, args.hlo_ops))

  if args.profile:
    jax.profiler.start_trace(args.profile)
    for _ in range(2):
      jax.block_until_ready(compiled(params_infer, j_lat, j_t, j_ctx))
    jax.profiler.stop_trace()
    notes.append(f"jax.profiler trace of 2 forward calls written to `{args.profile}`.")

  # -------------------------------------------------------- forward+backward (training shape)
  if not args.no_train:
    bt = args.train_batch
    # Tile the inference inputs when the training batch is the larger one.
    reps = -(-bt // b)
    tile = lambda a: jnp.concatenate([a] * reps)[:bt]
    x_tr, c_tr, t_tr = tile(j_lat), tile(j_ctx), tile(j_t)
    if jdt != jnp.float32:
      x_tr, c_tr = x_tr.astype(jdt), c_tr.astype(jdt)

    def loss(p, x, t, c):
      out = model.apply({"params": p}, x, t, c)
      return jnp.mean(jnp.square(out.astype(jnp.float32)))

    grad = jax.jit(jax.value_and_grad(loss))
    lower_g, compile_g, gcompiled, gflops = common.compile_time(grad, params_train, x_tr, t_tr, c_tr)

    ref_train = None
    if not args.no_torch:
      # Training in torch: float32 master weights with autocast on GPU, float32 on CPU.
      ref_train = ref.float()
      ref_train.train(False)  # dropout off on both sides (deterministic comparison)
      ttile = lambda a: torch.cat([a] * reps)[:bt]
      tl, tc, tt = ttile(t_lat).float(), ttile(t_ctx).float(), ttile(t_t)

      def torch_step():
        ref_train.zero_grad(set_to_none=True)
        with torch.enable_grad():
          if tdev == "cuda":
            with torch.autocast("cuda", dtype=tdt):
              out = ref_train(tl, tt, tc)
          else:
            out = ref_train(tl, tt, tc)
          l = out.float().square().mean()
          l.backward()
        return l

    t_ours_g, t_torch_g = _interleaved(
        lambda: gcompiled(params_train, x_tr, t_tr, c_tr),
        torch_step if ref_train is not None else None, args)
    rows.append(_row(f"fwd+bwd B{bt} F{f} {s}x{s}", t_ours_g, t_torch_g, gflops, peak,
                     compile_g + lower_g))

  header = ["pass", "ours ms (min)", "torch ms (min)", "ours/torch", "compile s (ours)",
            "XLA TFLOP", "ours TFLOP/s", "MFU ours", "MFU torch (same FLOPs)"]
  cfg_desc = (f"block_out_channels {cfg.block_out_channels}, heads {cfg.attention_head_dim}, "
              f"{n_params / 1e6:.0f} M params, ours {args.jax_dtype} "
              f"(attention {cfg.attention_impl or 'auto'}), torch {args.torch_dtype} "
              f"({args.torch_threads} threads, SDPA), max|ours-torch|/std = {err:.1e} (forward)")
  body = (f"{cfg_desc}. Median of {args.iters} after {args.warmup} warm-up, torch and ours "
          f"interleaved. Peak = {peak / 1e12:.3g} TFLOP/s ({peak_src}).\n\n"
          + common.markdown_table(header, rows) + ("\n\n" + "\n\n".join(notes) if notes else ""))
  common.append_section(f"UNet3D forward / backward ({args.backend}, {args.size})", body, args)


def _interleaved(ours_fn, torch_fn, args):
  """Times both alternately (warm-up first), so machine load drifts hit both equally."""
  for _ in range(args.warmup):
    common._sync(ours_fn())  # pylint: disable=protected-access
    if torch_fn is not None:
      common._sync(torch_fn())  # pylint: disable=protected-access
  ours, theirs = [], []
  for _ in range(args.iters):
    if torch_fn is not None:
      theirs.append(common.time_fn(torch_fn, warmup=0, iters=1).median)
    ours.append(common.time_fn(ours_fn, warmup=0, iters=1).median)
  return common.Timing(ours), (common.Timing(theirs) if theirs else None)


def _row(name, t_ours, t_torch, flops, peak, compile_s):
  ratio = f"{t_ours.median / t_torch.median:.2f}" if t_torch else "n/a"
  return [name, t_ours.fmt(), t_torch.fmt() if t_torch else "n/a", ratio, f"{compile_s:.1f}",
          f"{flops / 1e12:.3f}", f"{flops / t_ours.median / 1e12:.3f}",
          f"{100 * flops / t_ours.median / peak:.1f}%",
          f"{100 * flops / t_torch.median / peak:.1f}%" if t_torch else "n/a"]


def _hlo_breakdown(compiled, n):
  """The n HLO instruction kinds with the most FLOPs / bytes, from the optimised HLO text."""
  import collections  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  text = compiled.as_text()
  counts = collections.Counter(re.findall(r"= \w+\[[^\]]*\][^ ]* (\w+)\(", text))
  fusions = collections.Counter(re.findall(r'kind=k(\w+)', text))
  top = ", ".join(f"{k} x{v}" for k, v in counts.most_common(n))
  return (f"Optimised HLO: {sum(counts.values())} instructions; most frequent: {top}; "
          f"fusion kinds: {dict(fusions)}.")


if __name__ == "__main__":
  main()
