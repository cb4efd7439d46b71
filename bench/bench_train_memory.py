"""Compiled per-device memory of the full-size VidRD train step on an FSDP mesh (compile only).

Builds the training step of ``vidrd_jax.train`` for the full SD2.1-base UNet3D (1.18 B
parameters, VidRD temporal layers) + OpenCLIP-H text encoder, with the paper's trainable set
(temporal layers + spatial transformer blocks), AdamW + EMA state, bf16 compute with float32
master weights and remat, sharded over an N-device ``fsdp`` mesh of forced host (CPU) devices,
then lowers and compiles it against abstract inputs (nothing is allocated or executed) and
reads XLA's ``memory_analysis()`` of the per-device program.

Default shape: 16 frames x 256x256 (32x32 latents, pre-encoded as the v5e config trains),
per-device batch 1, 8 devices.

  python -m bench.bench_train_memory                     # 8 CPU devices, appends to BENCHMARKS.md
  python -m bench.bench_train_memory --video             # VAE encoder inside the step as well
  python -m bench.bench_train_memory --tpu-topology v5e:2x4   # TPU v5e x8 program, AOT

The CPU backend computes bf16 matmuls and convolutions in float32 (it converts their operands),
so its buffer assignment of a bf16 step holds float32 activations and float32 gathered weights:
an overestimate for accelerators. ``--tpu-topology`` compiles the same step ahead of time for a
TPU slice described by name (``jax.experimental.topologies``; needs ``libtpu`` importable, e.g.
``pip install --target /tmp/libtpu "libtpu==0.0.42.*"`` and ``PYTHONPATH=/tmp/libtpu`` for jax
0.10.2; no TPU needed) and reads the TPU compiler's own memory analysis, with the Pallas flash
attention TPU training uses.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _device_count_from_argv() -> int:
  for i, a in enumerate(sys.argv):
    if a.startswith("--devices="):
      return int(a.split("=", 1)[1])
    if a == "--devices" and i + 1 < len(sys.argv):
      return int(sys.argv[i + 1])
  return 8


# Must be set before jax is imported (bench.common imports it); affects the CPU platform only.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={_device_count_from_argv()}")

from bench import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _extra(p):
  p.add_argument("--devices", type=int, default=8, help="forced host devices (CPU) = fsdp size")
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--batch-per-device", type=int, default=1)
  p.add_argument("--no-remat", action="store_true")
  p.add_argument("--trainable", default="paper", help='"paper" or "all"')
  p.add_argument("--video", action="store_true",
                 help="feed 256x256 video and encode with the frozen VAE inside the step")
  p.add_argument("--tpu-topology", default="",
                 help="compile for this TPU slice ahead of time (e.g. v5e:2x4) instead of CPU devices")


def main():
  args = common.parse_args(__doc__.splitlines()[0], _extra)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vidrd_jax import train, train_config, train_lib  # pylint: disable=g-import-not-at-top

  devices = None
  if args.tpu_topology:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.tpu_topology).devices
  n = len(devices) if devices else jax.device_count()
  config = train_config.base_config()
  config.model.unet = "sd21_base"
  config.model.vae = "sd21"
  config.model.text_encoder = "openclip_h"
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "float32"
  config.model.remat = not args.no_remat
  config.trainable = args.trainable
  config.data.frames = args.frames
  config.data.resolution = args.resolution
  config.data.latents = not args.video
  config.global_batch_size = args.batch_per_device * n
  config.mesh.data = 1
  config.mesh.fsdp = -1
  mesh = None
  if devices:
    from vidrd_jax.parallel import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    mesh = sharding_lib.make_mesh(config.mesh.to_dict(), devices=devices)
    config.model.attention_impl = "splash"
    target = f"{n} x {devices[0].device_kind} ({args.tpu_topology}, AOT)"
  workdir = os.path.join("/tmp", "bench_train_memory")

  t0 = time.perf_counter()
  st = train.setup(config, workdir, mesh=mesh)
  t_setup = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered = st.train_step.lower(
      st.abstract_state, st.batch_shapes,
      jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                   st.abstract_frozen, st.frozen_shardings))
  t_lower = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  # The lowered program is the global one; MFU wants per-device work.
  flops = common.lowered_flops(lowered) / st.mesh.size

  def nbytes(tree):
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

  state = st.abstract_state
  n_params = train_lib.count_params(state.params)
  n_train = train_lib.count_params(state.ema_params)
  frozen_bytes = nbytes(st.abstract_frozen)
  # Largest per-device shard of the parameters (how well FSDP splits them).
  shard_bytes = sum(
      int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(state))
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  rows = [
      ["arguments (state shard + batch + frozen encoders)", gib(mem.argument_size_in_bytes)],
      ["outputs", gib(mem.output_size_in_bytes)],
      ["aliased (donated state)", gib(mem.alias_size_in_bytes)],
      ["temporaries (activations, gradients)", gib(mem.temp_size_in_bytes)],
      ["generated code", gib(mem.generated_code_size_in_bytes)],
      ["**total per device** (args + out - alias + temp)", f"**{gib(total)}**"],
      ["train state shard per device (params, EMA, Adam)", gib(shard_bytes)],
  ]
  body = (
      f"Full SD2.1-base UNet3D (VidRD temporal layers): {n_params / 1e6:.0f} M parameters, "
      f"{n_train / 1e6:.0f} M trainable (`trainable={args.trainable}`); frozen OpenCLIP-H text "
      f"encoder{' and SD VAE' if args.video else ''} ({frozen_bytes / 2**30:.2f} GiB, sharded over fsdp). "
      f"{args.frames} frames x {args.resolution}x{args.resolution} "
      f"({'video, VAE-encoded in the step' if args.video else 'pre-encoded 32x32x4 latents'}), "
      f"per-device batch {args.batch_per_device}, mesh fsdp={n} "
      f"({target if mesh is not None else f'{n} forced host devices'}), "
      f"bf16 compute / float32 master weights, remat {'off' if args.no_remat else 'on'}, "
      f"AdamW + EMA on the trainable leaves. Compile only (`jax.jit(...).lower().compile()` on "
      f"abstract inputs, `memory_analysis()` of the per-device program); "
      + ("the TPU compiler's own analysis, Pallas flash attention.\n\n" if mesh is not None else
         "the CPU backend computes bf16 dots and convolutions in float32, so this overstates "
         "an accelerator's memory (see `--tpu-topology`).\n\n")
      + common.markdown_table(["per device", "bytes"], rows)
      + f"\n\nGoal: fits 16 GiB per device -> **{'yes' if total < 16 * 2**30 else 'no'}**. "
      f"XLA FLOPs per device per step: {flops / 1e12:.2f} TFLOP. Setup (eval_shape, shardings) "
      f"{t_setup:.0f} s, lowering {t_lower:.0f} s, compile {t_compile:.0f} s.\n")
  common.append_section("Training memory" + (f" ({args.tpu_topology}, AOT)" if mesh is not None else ""),
                        body, args)


if __name__ == "__main__":
  main()
