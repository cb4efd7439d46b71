"""SD2.1 UNet (2D) forward: ours vs PyTorch (diffusers) vs the previous JAX port (diffusers 0.31 Flax).

diffusers 0.31.0 was the last release with ``FlaxUNet2DConditionModel``. It lives in its own
virtual environment (default /work/peer_venv, override with --peer-python or $PEER_PYTHON):

  python -m venv /work/peer_venv
  /work/peer_venv/bin/pip install diffusers==0.31.0 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 safetensors

(these pins resolved and run; flax 0.12.8 and jax 0.10.2 are the versions vidrd_jax uses too).
Never install it into the project's own environment.

All three run the same weights: a diffusers UNet2DConditionModel (SD2.1-base config, or the
reduced one) is randomised with a seed and saved as safetensors; ours converts it with
weight_conversion.unet (a UNet3D with every temporal layer off, inputs [16, 1, h, w, 4]); the
peer converts it with diffusers' own ``convert_pytorch_state_dict_to_flax`` in a subprocess
run by the peer venv's python. Inputs and outputs are exchanged as .npy files; every output
is compared with PyTorch's.

Shape: 16 latents of 32x32 (one 2-video CFG batch of 8 frames, seen as images) with 77 text
tokens. --size small: channels (128, 256, 512, 512), heads of 64; --size full: SD2.1-base.

  python -m bench.bench_flax_peer                    # CPU, small
  python -m bench.bench_flax_peer --size full        # CPU, SD2.1-base (about 10 GB RAM in total)
  python -m bench.bench_flax_peer --device gpu       # full size, bf16 / fp16
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _worker(workdir: str) -> None:
  """Runs in the peer venv: loads the safetensors, converts, times FlaxUNet2DConditionModel."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top

  with open(os.path.join(workdir, "job.json")) as f:
    job = json.load(f)
  dtype = jnp.dtype(job["dtype"])
  fields = set(inspect.signature(FlaxUNet2DConditionModel).parameters)
  config = {k: v for k, v in job["config"].items() if k in fields}
  model = FlaxUNet2DConditionModel(dtype=dtype, **config)

  class _Arr:  # the converter calls .numpy() on every torch tensor
    def __init__(self, a):
      self.a = a

    def numpy(self):
      return self.a

  t0 = time.perf_counter()
  sd = load_file(os.path.join(workdir, "unet.safetensors"))
  params = convert_pytorch_state_dict_to_flax({k: _Arr(v) for k, v in sd.items()}, model)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
  convert_s = time.perf_counter() - t0
  x = jnp.asarray(np.load(os.path.join(workdir, "sample.npy")), dtype)    # [B, 4, h, w]
  ctx = jnp.asarray(np.load(os.path.join(workdir, "context.npy")), dtype)  # [B, 77, D]
  t = jnp.asarray(np.load(os.path.join(workdir, "timesteps.npy")))
  fwd = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c).sample)
  t0 = time.perf_counter()
  compiled = fwd.lower(params, x, t, ctx).compile()
  compile_s = time.perf_counter() - t0
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  out = jax.block_until_ready(compiled(params, x, t, ctx))
  np.save(os.path.join(workdir, "peer_out.npy"), np.asarray(out, np.float32))
  for _ in range(job["warmup"]):
    jax.block_until_ready(compiled(params, x, t, ctx))
  samples = []
  for _ in range(job["iters"]):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, x, t, ctx))
    samples.append(time.perf_counter() - t0)
  with open(os.path.join(workdir, "peer_result.json"), "w") as f:
    json.dump({"samples": samples, "compile_s": compile_s, "convert_s": convert_s,
               "flops": float((ca or {}).get("flops", float("nan"))),
               "versions": f"diffusers {diffusers.__version__}, jax {jax.__version__}, "
                           f"flax {__import__('flax').__version__}",
               "device": str(jax.devices()[0].device_kind)}, f)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
  _worker(sys.argv[2])
  sys.exit(0)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _extra(p):
  p.add_argument("--images", type=int, default=16)
  p.add_argument("--latent", type=int, default=32)
  p.add_argument("--channels", default=None)
  p.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON", "/work/peer_venv/bin/python"))
  p.add_argument("--workdir", default=None, help="exchange folder (default: a temp dir)")


def main():
  args = common.parse_args(__doc__.splitlines()[0], extra=_extra)
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  torch = common.setup_torch(args)
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from tests.torch_reference.unet3d import randomize_  # pylint: disable=g-import-not-at-top
  from vidrd_jax.models.unet3d import UNet3DConditionModel  # pylint: disable=g-import-not-at-top
  from weight_conversion.unet import unet_from_torch  # pylint: disable=g-import-not-at-top

  jdt = jnp.dtype(args.jax_dtype)
  cfg = common.unet3d_config(args, args.channels, add_temp_conv=False, add_temp_embed=False,
                             add_temp_attn=False)
  dcfg = {k: v for k, v in cfg.to_diffusers(include_temporal=False).items() if not k.startswith("_")}

  workdir = args.workdir or tempfile.mkdtemp(prefix="vidrd_peer_")
  os.makedirs(workdir, exist_ok=True)
  torch.manual_seed(0)
  tunet = UNet2DConditionModel(**dcfg)
  randomize_(tunet, 0)
  tunet.eval()
  sd = {k: v.detach().numpy().copy() for k, v in tunet.state_dict().items()}
  n_params = sum(v.size for v in sd.values())
  save_file(sd, os.path.join(workdir, "unet.safetensors"))
  print(f"{n_params / 1e6:.0f} M params saved to {workdir}", flush=True)

  b, s = args.images, args.latent
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, 4, s, s)).astype(np.float32)
  ctx = rng.standard_normal((b, 77, cfg.cross_attention_dim)).astype(np.float32)
  ts = np.full((b,), 981, np.int32)
  np.save(os.path.join(workdir, "sample.npy"), x)
  np.save(os.path.join(workdir, "context.npy"), ctx)
  np.save(os.path.join(workdir, "timesteps.npy"), ts)

  # PyTorch.
  tdev = common.torch_device(args)
  tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.torch_dtype]
  tunet = tunet.to(tdev, tdt)
  tx, tc = torch.from_numpy(x).to(tdev, tdt), torch.from_numpy(ctx).to(tdev, tdt)
  tt = torch.from_numpy(ts.astype(np.int64)).to(tdev)
  with torch.no_grad():
    ref = tunet(tx, tt, tc).sample.float().cpu().numpy()
    t_torch = common.time_fn(lambda: tunet(tx, tt, tc), warmup=args.warmup, iters=args.iters)
  del tunet, tx, tc
  print(f"torch: {t_torch}", flush=True)

  # Ours (temporal layers off, frames = 1: the plain SD2.1 UNet).
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jdt), unet_from_torch(sd, cfg))
  del sd
  model = UNet3DConditionModel(cfg)
  jx = jnp.asarray(x.transpose(0, 2, 3, 1)[:, None], jdt)
  jc, jt = jnp.asarray(ctx, jdt), jnp.asarray(ts)
  fwd = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  lower_s, compile_s, compiled, flops = common.compile_time(fwd, params, jx, jt, jc)
  ours = np.asarray(compiled(params, jx, jt, jc), np.float32)[:, 0].transpose(0, 3, 1, 2)
  t_ours = common.time_fn(lambda: compiled(params, jx, jt, jc), warmup=args.warmup, iters=args.iters)
  del params, compiled
  print(f"ours: {t_ours}", flush=True)

  # The peer, in its own venv and process (its memory is freed before we go on).
  peer = None
  peer_err = float("nan")
  with open(os.path.join(workdir, "job.json"), "w") as f:
    json.dump({"config": dcfg, "dtype": args.jax_dtype, "warmup": args.warmup, "iters": args.iters}, f)
  env = dict(os.environ)
  env.pop("PYTHONPATH", None)
  if not os.path.exists(args.peer_python):
    peer_msg = f"peer python {args.peer_python} not found (see the module docstring to create it)"
  else:
    t0 = time.perf_counter()
    proc = subprocess.run([args.peer_python, os.path.abspath(__file__), "--worker", workdir],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      peer_msg = "peer failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
      print(proc.stderr[-3000:], file=sys.stderr)
    else:
      with open(os.path.join(workdir, "peer_result.json")) as f:
        peer = json.load(f)
      peer_out = np.load(os.path.join(workdir, "peer_out.npy"))
      peer_err = float(np.abs(peer_out - ref).max() / ref.std())
      peer_msg = f"peer subprocess took {time.perf_counter() - t0:.0f}s in all"
    print(peer_msg, flush=True)

  ours_err = float(np.abs(ours - ref).max() / ref.std())
  peak, peak_src = common.peak_flops(args.jax_dtype)
  rows = [["PyTorch (diffusers 0.36 UNet2DConditionModel)", t_torch.fmt(), "1.00", "n/a", "0",
           f"{100 * flops / t_torch.median / peak:.1f}%"],
          ["ours (vidrd_jax UNet3D, temporal off)", t_ours.fmt(),
           f"{t_ours.median / t_torch.median:.2f}", f"{lower_s + compile_s:.1f}", f"{ours_err:.1e}",
           f"{100 * flops / t_ours.median / peak:.1f}%"]]
  if peer is not None:
    tp = common.Timing(peer["samples"])
    rows.append([f"JAX peer ({peer['versions']} FlaxUNet2DConditionModel)", tp.fmt(),
                 f"{tp.median / t_torch.median:.2f}", f"{peer['compile_s']:.1f}", f"{peer_err:.1e}",
                 f"{100 * flops / tp.median / peak:.1f}%"])
  else:
    rows.append(["JAX peer (diffusers 0.31 Flax)", peer_msg, "", "", "", ""])
  header = ["implementation", "forward ms (min)", "time / PyTorch", "compile s",
            "max err / std vs PyTorch", "MFU (XLA FLOPs of ours)"]
  body = (f"{b} latents of {s}x{s}, 77 text tokens, channels {cfg.block_out_channels}, "
          f"{n_params / 1e6:.0f} M params; JAX sides {args.jax_dtype}, torch {args.torch_dtype} "
          f"({args.torch_threads} threads). Median of {args.iters} after {args.warmup} warm-up; "
          f"run one after another (torch, ours, peer), not interleaved. XLA FLOPs of ours "
          f"{flops / 1e12:.3f} TFLOP" + (f", of the peer {peer['flops'] / 1e12:.3f} TFLOP" if peer else "")
          + f"; peak {peak / 1e12:.3g} TFLOP/s ({peak_src}).\n\n" + common.markdown_table(header, rows))
  common.append_section(f"SD2.1 UNet 2D: ours vs PyTorch vs diffusers-Flax peer ({args.backend}, {args.size})",
                        body, args)


if __name__ == "__main__":
  main()
