"""One long video end to end: ours (vidrd_jax generate) vs the PyTorch reference pipeline loop.

Both sides run the same weights (PyTorch models randomised with a seed, converted with
weight_conversion.{unet,vae,text_encoder}), the same prompt ids and the same noise (our
``init_latents`` / ``clip_noise``), on the same device in the same process:

* ours: ``vidrd_jax.diffusion.long_video.generate`` with ``decode=True, reference_exact=True``
  (each frame decoded alone, as the released reference does, so both decode the same work);
* PyTorch: the reference pipeline's loop (``model/pipeline.py``, re-written here from
  shared/design.md): text encoder, DDIM (diffusers DDIMScheduler) with CFG on a [uncond, cond]
  batch, FNR + PNS for later clips, DSG on the overlap frames, diffusers AutoencoderKL decode
  per frame -- with the reference UNet3D of tests/torch_reference/unet3d.py.

Also measured: compile time of the sampler (first call minus a warm call), the number of XLA
compilations during the clips (later clips must not recompile), sampler overhead = time per
DDIM step of the full sampler / time of the bare UNet call at the same shape (goal <= 1.03),
peak memory (device allocator peak on accelerators, RSS above start on CPU), and MFU.

  --size full : SD2.1-base UNet3D + SD VAE + OpenCLIP-H text tower, 256x256, 4 clips x 8 frames,
                overlap 4, 50 DDIM steps, guidance 10 (bf16 ours / fp16 torch on GPU).
  --size small: UNet3D with channels (128, 256, 512, 512), VAE (32, 64, 128, 128), a 1-layer
                1024-wide text tower; 256x256, 2 clips x 4 frames, overlap 2, 4 steps (CPU).

  python -m bench.bench_sampling                 # CPU, small
  python -m bench.bench_sampling --device gpu    # full size
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top


def _extra(p):
  p.add_argument("--clips", type=int, default=None)
  p.add_argument("--frames", type=int, default=None)
  p.add_argument("--overlap", type=int, default=None)
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--prompts", type=int, default=1, help="videos per batch (UNet batch = 2x this)")
  p.add_argument("--channels", default=None, help="UNet block_out_channels override")
  p.add_argument("--guidance", type=float, default=10.0)
  p.add_argument("--no-torch", action="store_true")


def sizes(args):
  full = args.size == "full"
  return dict(
      clips=args.clips or (4 if full else 2),
      frames=args.frames or (8 if full else 4),
      overlap=args.overlap if args.overlap is not None else (4 if full else 2),
      steps=args.steps or (50 if full else 4),
  )


# ------------------------------------------------------------------------------------ models


def build(args):
  """Torch models (reference UNet3D, AutoencoderKL, CLIPTextModel) and our Pipeline, same weights."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  torch = common.setup_torch(args)
  from diffusers import AutoencoderKL as TorchVAE  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig as HFTextConfig  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextModel as HFTextModel  # pylint: disable=g-import-not-at-top

  from tests.torch_reference.unet3d import build_reference_unet3d, randomize_  # pylint: disable=g-import-not-at-top
  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.text_encoder import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.unet3d import UNet3DConditionModel  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.vae import AutoencoderKL, AutoencoderKLConfig  # pylint: disable=g-import-not-at-top
  from vidrd_jax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from weight_conversion.text_encoder import text_encoder_from_torch  # pylint: disable=g-import-not-at-top
  from weight_conversion.unet import unet_from_torch  # pylint: disable=g-import-not-at-top
  from weight_conversion.vae import vae_from_torch  # pylint: disable=g-import-not-at-top

  full = args.size == "full"
  jdt = jnp.dtype(args.jax_dtype)
  ucfg = common.unet3d_config(args, args.channels, attention_impl=None)
  vcfg = AutoencoderKLConfig.sd21(dtype=jdt) if full else AutoencoderKLConfig.sd21(
      block_out_channels=(32, 64, 128, 128), dtype=jdt)
  tcfg = CLIPTextConfig.openclip_h(dtype=jdt) if full else CLIPTextConfig.openclip_h(
      num_hidden_layers=1, dtype=jdt)

  t0 = time.perf_counter()
  t_unet = build_reference_unet3d(ucfg.to_diffusers(), seed=0)
  torch.manual_seed(1)
  t_vae = TorchVAE(**{k: v for k, v in vcfg.to_diffusers().items() if not k.startswith("_")})
  t_text = HFTextModel(HFTextConfig.from_dict(tcfg.to_hf()))
  # Every weight random (with the reference UNet's recipe): nothing stays at its zero init.
  randomize_(t_vae, 1)
  randomize_(t_text, 2)
  for m in (t_vae, t_text):
    m.eval()
  sd = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}
  params = {
      "unet": unet_from_torch(sd(t_unet), ucfg),
      "vae": vae_from_torch(sd(t_vae), vcfg),
      "text_encoder": text_encoder_from_torch(sd(t_text), tcfg),
  }
  # Sampling keeps weights in the compute dtype (bf16 on accelerators).
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jdt), params)
  tok_dir = os.path.join(tempfile.gettempdir(), "vidrd_bench_tokenizer")
  pipe = pipeline_lib.Pipeline(
      unet=UNet3DConditionModel(ucfg), vae=AutoencoderKL(vcfg), text_encoder=CLIPTextModel(tcfg),
      tokenizer=Tokenizer.from_open_clip_vocab(tok_dir), params=params,
      scheduler_config=pipeline_lib.ddim_scheduler_config())
  n_unet = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params["unet"]))
  print(f"built models in {time.perf_counter() - t0:.1f}s (UNet {n_unet / 1e6:.0f} M params)",
        flush=True)
  dev, tdt = common.torch_device(args), _torch_dtype(torch, args.torch_dtype)
  torch_models = tuple(m.to(device=dev, dtype=tdt) for m in (t_unet, t_vae, t_text))
  return pipe, torch_models, ucfg, n_unet


def _torch_dtype(torch, name):
  return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ----------------------------------------------------------------------- the PyTorch reference


def torch_long_video(models, ids, neg_ids, init_latents, clip_noise, *, clips, frames, overlap,
                     steps, guidance, noise_recycle, dsg, scaling_factor, device, dtype,
                     scheduler_config, step_times=None):
  """The reference pipeline's long-video loop (model/pipeline.py), batch-first PyTorch layout.

  init_latents: [B, C, N, h, w]; clip_noise: [B, K-1, C, N, h, w] standard normals.
  Returns decoded frames [B, 3, K*N, H, W] in [0, 1] and the final latents of every clip.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  unet, vae, text = models
  sched = DDIMScheduler.from_config({k: v for k, v in scheduler_config.items()
                                     if not k.startswith("_")})
  with torch.no_grad():
    cond = text(ids.to(device))[0]
    uncond = text(neg_ids.to(device))[0]
    # CFG batch: [uncond, cond], as the reference concatenates it.
    ctx = torch.cat([uncond, cond]).to(dtype)
    sched.set_timesteps(steps, device=device)
    latents = init_latents.to(device, dtype) * sched.init_noise_sigma
    past = {}
    videos, finals = [], []
    c_recycle = noise_recycle / math.sqrt(1 + noise_recycle**2)
    for clip in range(clips):
      if clip > 0:
        # FNR: the overlap frames restart from the previous clip's reversed initial noise;
        # PNS: the others mix it with fresh noise of std 1/sqrt(1+alpha^2).
        more = clip_noise[:, clip - 1].to(device, dtype) / math.sqrt(1 + noise_recycle**2)
        latents = latents.clone()
        latents[:, :, :overlap] = past[0][:, :, :overlap]
        latents[:, :, overlap:] = c_recycle * past[0][:, :, overlap:] + more[:, :, overlap:]
      for i, t in enumerate(sched.timesteps):
        t_step = time.perf_counter()
        if clip > 0:
          # DSG: frame j < M follows the previous clip's frame N-1-j while i < (M-j)(S/M)beta.
          for j in range(overlap):
            if i < (overlap - j) * (len(sched.timesteps) / overlap) * dsg:
              latents[:, :, j] = past[i][:, :, j]
        past[i] = latents.flip(dims=[2])
        model_in = sched.scale_model_input(torch.cat([latents] * 2), t)
        eps = unet(model_in, t, ctx)
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        b, c, f, h, w = latents.shape
        flat = lambda x: x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        latents = sched.step(flat(eps), t, flat(latents), eta=0.0).prev_sample
        latents = latents.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
        if step_times is not None:
          if device == "cuda":
            torch.cuda.synchronize()
          step_times.append(time.perf_counter() - t_step)
      finals.append(latents)
      # The released pipeline decodes every frame alone (its temporal VAE gets num_frames=1).
      b, c, f, h, w = latents.shape
      z = (latents / scaling_factor).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
      video = vae.decode(z).sample
      video = video.reshape(b, f, *video.shape[1:]).permute(0, 2, 1, 3, 4)
      videos.append((video / 2 + 0.5).clamp(0, 1).float())
    out = torch.cat(videos, dim=2)
    if device == "cuda":
      torch.cuda.synchronize()
  return out, finals


# -------------------------------------------------------------------------------------- main


def main():
  args = common.parse_args(__doc__.splitlines()[0], extra=_extra)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vidrd_jax.diffusion import long_video  # pylint: disable=g-import-not-at-top

  sz = sizes(args)
  k, n, m, s = sz["clips"], sz["frames"], sz["overlap"], sz["steps"]
  pipe, tmodels, ucfg, n_unet = build(args)
  torch = sys.modules["torch"]
  tdev, tdt = common.torch_device(args), _torch_dtype(torch, args.torch_dtype)
  factor = pipe.vae_downsample_factor
  hl = args.resolution // factor
  bsz = args.prompts
  prompts = ["a boat is sailing in a lake", "wood on fire", "a dog running on the beach",
             "a city street at night"][:bsz]
  prompts += ["a mountain landscape"] * (bsz - len(prompts))
  neg = "watermark"
  rng = np.random.default_rng(0)
  init = rng.standard_normal((bsz, n, hl, hl, 4)).astype(np.float32)
  clip_noise = rng.standard_normal((bsz, k - 1, n, hl, hl, 4)).astype(np.float32)
  gen_kw = dict(num_clips=k, frames_per_clip=n, overlap=m, noise_recycle=4.0, staged_guidance=0.4,
                num_steps=s, guidance_scale=args.guidance, negative_prompt=neg, height=args.resolution,
                width=args.resolution, init_latents=init, clip_noise=clip_noise)
  desc = (f"{bsz} prompt(s) x {k} clips x {n} frames at {args.resolution}x{args.resolution} "
          f"(latents {hl}x{hl}), overlap {m}, {s} DDIM steps, CFG {args.guidance}")
  print(desc, flush=True)
  rows, notes = [], []

  # ---- ours: cold call (compiles), then warm calls.
  with common.CompileLog() as cold_log:
    t_cold, out = common.time_once(lambda: long_video.generate(pipe, prompts, decode=True,
                                                               reference_exact=True, **gen_kw))
  run_ours = lambda: long_video.generate(pipe, prompts, decode=True, reference_exact=True, **gen_kw)
  with common.CompileLog() as warm_log, common.PeakMemory() as mem:
    t_warm = common.time_fn(run_ours, warmup=0, iters=max(1, args.iters - 1))
  ours_frames = out.frames
  clip_compiles = cold_log.count("denoise_clip")
  ok = clip_compiles == 1 and warm_log.count() == 0
  notes.append(
      f"Compilation: the first call took {t_cold:.1f}s against {t_warm.median:.1f}s warm, i.e. "
      f"{t_cold - t_warm.median:.1f}s of first-call cost; XLA compiled {cold_log.count()} programs "
      f"in {cold_log.seconds():.1f}s (largest: {cold_log.top(4)}). The per-clip sampler "
      f"`denoise_clip` was compiled {clip_compiles} time(s) for all {k} clips and the warm call "
      f"compiled {warm_log.count()} program(s): "
      + ("later clips do not recompile." if ok else "**later clips or calls RECOMPILE**."))

  # ---- sampler overhead: the latents sampler alone vs the bare UNet at the same shape.
  context = pipe.encode_prompt(prompts)
  negative = pipe.encode_prompt([neg] * bsz)
  sample_kw = dict(latent_shape=(hl, hl, 4), num_clips=k, frames_per_clip=n, overlap=m,
                   noise_recycle=4.0, staged_guidance_strength=0.4, num_steps=s,
                   guidance_scale=args.guidance, init_latents=init, clip_noise=clip_noise)
  denoiser = long_video.UNetDenoiser(pipe.unet)
  run_sampler = lambda: long_video.sample_long_video(
      denoiser, pipe.params["unet"], pipe.scheduler, context, negative, **sample_kw).latents
  unet_call = jax.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))
  x2 = jnp.asarray(np.repeat(init, 2, axis=0))
  t2 = jnp.full((2 * bsz,), 981, jnp.int32)
  c2 = jnp.concatenate([negative, context]).astype(context.dtype)
  _, _, compiled_unet, unet_flops = common.compile_time(unet_call, pipe.params["unet"], x2, t2, c2)

  def run_bare_unet():
    # The sampler's K*S UNet calls, back to back, synchronised once (as inside the scan).
    out = None
    for _ in range(k * s):
      out = compiled_unet(pipe.params["unet"], x2, t2, c2)
    return out

  # Interleaved rounds (sampler, then the same number of bare UNet calls): a drift in machine
  # speed between two separately timed phases moved this ratio by 10-30% on a shared CPU.
  common._sync(run_sampler())  # pylint: disable=protected-access
  common._sync(run_bare_unet())  # pylint: disable=protected-access
  sampler_s, unet_s = [], []
  for _ in range(max(args.iters, 3)):
    sampler_s.append(common.time_once(run_sampler)[0])
    unet_s.append(common.time_once(run_bare_unet)[0] / (k * s))
  t_sampler, t_unet = common.Timing(sampler_s), common.Timing(unet_s)
  per_step = t_sampler.median / (k * s)
  overhead = float(np.median([a / (k * s) / b for a, b in zip(sampler_s, unet_s)]))
  peak, peak_src = common.peak_flops(args.jax_dtype)
  total_flops = unet_flops * k * s

  # ---- PyTorch reference loop.
  t_torch = None
  torch_steps = []
  if not args.no_torch:
    ids = torch.from_numpy(np.asarray(pipe.tokenize(prompts)).astype(np.int64))
    neg_ids = torch.from_numpy(np.asarray(pipe.tokenize([neg] * bsz)).astype(np.int64))
    t_init = torch.from_numpy(np.ascontiguousarray(init.transpose(0, 4, 1, 2, 3)))
    t_noise = torch.from_numpy(np.ascontiguousarray(clip_noise.transpose(0, 1, 5, 2, 3, 4)))
    tkw = dict(clips=k, frames=n, overlap=m, steps=s, guidance=args.guidance, noise_recycle=4.0,
               dsg=0.4, scaling_factor=pipe.scaling_factor, device=tdev, dtype=tdt,
               scheduler_config=pipe.scheduler_config)
    if tdev == "cuda":
      torch.cuda.reset_peak_memory_stats()
    with common.PeakMemory() as tmem:
      # One untimed warm-up (cuDNN autotuning, allocator growth), then timed runs.
      if args.warmup:
        torch_long_video(tmodels, ids, neg_ids, t_init, t_noise, **tkw)
      # Timed runs alternate with runs of ours, so that load from other jobs on a shared
      # machine hits both sides alike; the ratio uses these paired runs.
      samples, ours_paired = [], []
      for it in range(max(1, args.iters - 1)):
        t0 = time.perf_counter()
        tvideo, tfinals = torch_long_video(tmodels, ids, neg_ids, t_init, t_noise,
                                           step_times=torch_steps if it == 0 else None, **tkw)
        samples.append(time.perf_counter() - t0)
        ours_paired.append(common.time_fn(run_ours, warmup=0, iters=1).median)
    t_torch = common.Timing(samples)
    t_ours_paired = common.Timing(ours_paired)
    torch_peak = (torch.cuda.max_memory_allocated() if tdev == "cuda" else tmem.peak)
    # Same noise, same weights: the final latents should agree up to float error growth.
    ours_lat = np.asarray(out.latents, np.float32)  # [B, K, N, h, w, C]
    ref_lat = np.stack([f.float().cpu().numpy().transpose(0, 2, 3, 4, 1) for f in tfinals], 1)
    lat_err = float(np.abs(ours_lat - ref_lat).max() / ref_lat.std())
    ref_frames = (tvideo.cpu().numpy().transpose(0, 2, 3, 4, 1) * 255).round()
    pix_err = float(np.abs(ours_frames.astype(np.float32) - ref_frames).max())
    notes.append(f"Agreement with the PyTorch loop (same noise and weights): final latents "
                 f"max|diff|/std = {lat_err:.2e}; decoded uint8 frames max|diff| = {pix_err:.0f}.")
    # Torch's own per-step vs bare-UNet overhead, for comparison.
    with torch.no_grad():
      tx = torch.from_numpy(np.ascontiguousarray(np.repeat(init, 2, 0).transpose(0, 4, 1, 2, 3))
                            ).to(tdev, tdt)
      tc = torch.from_numpy(np.asarray(c2, np.float32)).to(tdev, tdt)
      tt = torch.full((2 * bsz,), 981, device=tdev)
      t_unet_torch = common.time_fn(lambda: tmodels[0](tx, tt, tc), warmup=1,
                                    iters=max(args.iters, 3))
    torch_step = float(np.median(torch_steps))

  ours_mem = mem.peak
  rows.append(["ours (vidrd_jax generate)", f"{t_warm.median:.2f}", f"{t_cold:.1f}",
               f"{per_step * 1e3:.0f}", f"{t_unet.median * 1e3:.0f}", f"{overhead:.3f}",
               f"{100 * total_flops / t_warm.median / peak:.1f}%", common.fmt_bytes(ours_mem)])
  if t_torch is not None:
    rows.append(["PyTorch reference loop", f"{t_torch.median:.2f}", "n/a",
                 f"{torch_step * 1e3:.0f}", f"{t_unet_torch.median * 1e3:.0f}",
                 f"{torch_step / t_unet_torch.median:.3f}",
                 f"{100 * total_flops / t_torch.median / peak:.1f}%", common.fmt_bytes(torch_peak)])
    notes.insert(0, f"**ours / torch end to end = {t_ours_paired.median / t_torch.median:.2f}** "
                    f"(runs alternating: ours {t_ours_paired.median:.2f} s, torch "
                    f"{t_torch.median:.2f} s; < 1: ours faster; goal on GPU: <= 0.77, i.e. 1.3x "
                    f"faster; on CPU: <= 1.0).")
  header = ["pipeline", "end-to-end s (warm)", "first call s", "per DDIM step ms",
            "bare UNet call ms", "step / UNet (goal <= 1.03)", "MFU (UNet FLOPs)", "peak memory"]
  body = (f"{desc}; UNet3D {n_unet / 1e6:.0f} M params ({ucfg.block_out_channels}), ours "
          f"{args.jax_dtype}, torch {args.torch_dtype} ({args.torch_threads} threads). "
          f"UNet FLOPs per CFG step (XLA) {unet_flops / 1e12:.3f} TFLOP, {total_flops / 1e12:.2f} "
          f"TFLOP per video; peak {peak / 1e12:.3g} TFLOP/s ({peak_src}). Memory: {mem.kind}. "
          f"Per-step for ours = latents sampler alone (`sample_long_video`, no text/decoder) / "
          f"(K*S), timed in rounds alternating with K*S bare UNet calls (step / UNet is the "
          f"median of the rounds' ratios); "
          f"for torch = median wall time of one loop iteration.\n\n"
          + common.markdown_table(header, rows) + "\n\n" + "\n\n".join(f"- {x}" for x in notes))
  common.append_section(f"Long-video sampling ({args.backend}, {args.size})", body, args)


if __name__ == "__main__":
  main()
