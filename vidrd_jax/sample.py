"""Text-to-long-video sampling from the command line.

  python -m vidrd_jax.sample --config=configs/sample.py \
      --config.checkpoint=/models/vidrd_converted --config.prompt="wood on fire" --config.num_clips=4

  python -m vidrd_jax.sample --config=configs/sample.py --config.checkpoint=DIR \
      --config.prompts_file=prompts.txt --config.output_dir=out   # one prompt per line, or a JSON list

For every prompt it writes ``NNNN_<slug>.mp4``, ``NNNN_<slug>.gif`` and ``NNNN_<slug>.json``
(every setting used, so the video can be regenerated) into ``output_dir``. Prompts are sampled
``batch_size`` at a time, sharded over all devices; on a multi-host pod slice every host runs the
same command (``jax.distributed.initialize()`` is called when the environment says so) and the
first host writes the files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any, Sequence

import ml_collections

_log = logging.getLogger("vidrd_jax.sample")

# Environment variables that mean "this process is one of several" for jax.distributed.
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def _launched_multi_process() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if env.get(name, "1").isdigit() and int(env.get(name, "1")) > 1:
      return True
  # Multi-host TPU slices list every worker, comma-separated.
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed(mode: Any = "auto") -> bool:
  """Calls ``jax.distributed.initialize()`` when asked, or ("auto") when launched multi-process."""
  import jax  # pylint: disable=g-import-not-at-top
  if isinstance(mode, str):
    mode = mode.lower()
    if mode not in ("auto", "true", "false", "yes", "no", "1", "0"):
      raise ValueError(f"distributed must be auto / true / false, got {mode!r}")
    mode = _launched_multi_process() if mode == "auto" else mode in ("true", "yes", "1")
  if mode and not jax.distributed.is_initialized():
    jax.distributed.initialize()
    return True
  return False


def load_prompts(prompt: str = "", prompts_file: str = "") -> list[str]:
  """The prompt list from ``prompt`` and/or ``prompts_file`` (.json: a list of strings; else
  one prompt per non-empty line, ``#`` lines skipped)."""
  prompts = [prompt] if prompt else []
  if prompts_file:
    try:
      with open(prompts_file, encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"cannot read prompts_file {prompts_file!r}: {e}") from e
    if prompts_file.lower().endswith(".json"):
      try:
        data = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f"prompts_file {prompts_file!r} is not valid JSON: {e}") from e
      if isinstance(data, dict) and "prompts" in data:
        data = data["prompts"]
      if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise ValueError(f"prompts_file {prompts_file!r} must hold a JSON list of strings")
      prompts += [p.strip() for p in data if p.strip()]
    else:
      prompts += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
  if not prompts:
    where = f"prompts_file {prompts_file!r} has no prompts" if prompts_file else "no prompt given"
    raise ValueError(f"{where}: set --config.prompt=... or --config.prompts_file=...")
  return prompts


def slugify(text: str, max_len: int = 48) -> str:
  slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
  return slug[:max_len].rstrip("_") or "video"


def _settings(config: ml_collections.ConfigDict) -> dict:
  return {k: v for k, v in config.to_dict().items() if k not in ("prompt", "prompts_file")}


def run(config: ml_collections.ConfigDict) -> list[dict]:
  """Samples every prompt and writes its files; returns the per-prompt records (JSON sidecars).

  Raises:
    ValueError / FileNotFoundError with a message naming the problem, before any sampling.
  """
  maybe_initialize_distributed(config.get("distributed", "auto"))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from vidrd_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from vidrd_jax import video_io  # pylint: disable=g-import-not-at-top
  from vidrd_jax.diffusion import long_video  # pylint: disable=g-import-not-at-top

  prompts = load_prompts(config.prompt, config.prompts_file)
  if not config.checkpoint:
    raise ValueError("set --config.checkpoint=<converted pipeline directory>")
  if not os.path.isdir(config.checkpoint):
    raise FileNotFoundError(f"checkpoint directory not found: {config.checkpoint}")
  missing = pipeline_lib.missing_pieces(config.checkpoint)
  if missing:
    raise FileNotFoundError(f"checkpoint {config.checkpoint} lacks: {', '.join(missing)}")
  long_video.validate_long_video_args(
      config.num_clips, config.frames_per_clip, config.overlap, config.noise_recycle, config.staged_guidance,
      config.noise_alpha, config.num_steps, config.eta)
  if config.fps <= 0:
    raise ValueError(f"fps must be positive, got {config.fps}")

  dtype = {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if config.dtype not in dtype:
    raise ValueError(f"dtype must be one of {sorted(k for k in dtype if k)}, got {config.dtype!r}")
  # The fast path by default: bf16 on accelerators (MXU / tensor cores), float32 on CPU where
  # bf16 matmuls are emulated and slower.
  dtype[""] = jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else None
  started = time.time()
  # Parameters replicated over every device (of every host) straight from the checkpoint.
  mesh = long_video.make_data_mesh()
  pipe = pipeline_lib.load_pipeline(config.checkpoint, dtype=dtype[config.dtype],
                                    attention_impl=config.attention_impl or None,
                                    shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  factor = long_video.pixel_size_multiple(pipe)
  size = dict(zip(("height", "width"), pipe.native_size))
  for name in ("height", "width"):
    if config[name] < 0 or config[name] % factor:
      raise ValueError(f"{name}={config[name]} must be a positive multiple of {factor} for this model "
                       f"(or 0: the checkpoint's own size, here {size[name]})")
    size[name] = config[name] or size[name]
  load_s = time.time() - started

  ndev = jax.device_count()
  batch_size = config.batch_size or ndev
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(config.output_dir, exist_ok=True)
  steps_total = -(-len(prompts) // batch_size) * config.num_clips * config.num_steps
  bar = None
  progress = None
  batches_done = [0]
  if config.progress:
    # Every host must run the same program, so all of them get the callback; one shows the bar.
    if is_writer:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=steps_total, unit="step", desc="sampling", dynamic_ncols=True)

    def progress(clip, steps_done):  # pylint: disable=function-redefined
      if bar is not None:
        # Position within this batch's clips x steps; batches before it are already counted.
        done = batches_done[0] * config.num_clips * config.num_steps + clip * config.num_steps + steps_done
        bar.set_postfix_str(f"clip {clip + 1}/{config.num_clips}", refresh=False)
        bar.update(done - bar.n)

  records = []
  for first in range(0, len(prompts), batch_size):
    batch = prompts[first:first + batch_size]
    t0 = time.time()
    out = long_video.generate(
        pipe, batch, num_clips=config.num_clips, frames_per_clip=config.frames_per_clip,
        overlap=config.overlap, noise_recycle=config.noise_recycle, staged_guidance=config.staged_guidance,
        noise_alpha=config.noise_alpha, num_steps=config.num_steps, guidance_scale=config.guidance_scale,
        negative_prompt=config.negative_prompt, eta=config.eta, height=size["height"], width=size["width"],
        seed=config.seed, reference_exact=config.reference_exact, prompt_ids=range(first, first + len(batch)),
        mesh=mesh, progress=progress)
    elapsed = time.time() - t0
    batches_done[0] += 1
    if not is_writer:
      continue
    for j, prompt in enumerate(batch):
      index = first + j
      stem = os.path.join(config.output_dir, f"{index:04d}_{slugify(prompt)}")
      codec = video_io.write_mp4(stem + ".mp4", out.frames[j], fps=config.fps)
      video_io.write_gif(stem + ".gif", out.frames[j], fps=config.fps)
      record = {
          "prompt": prompt,
          "prompts_file": config.prompts_file,
          "index": index,
          "files": {"mp4": stem + ".mp4", "gif": stem + ".gif"},
          "num_frames": int(out.frames.shape[1]),
          "frame_size": [int(out.frames.shape[2]), int(out.frames.shape[3])],
          # The sizes actually used, so that the settings regenerate this video.
          "settings": {**_settings(config), **size},
          # Noise of this prompt comes from fold_in(PRNGKey(seed), index).
          "noise_id": index,
          "scheduler": pipe.scheduler.to_config(),
          "timesteps": [int(t) for t in pipe.scheduler.timesteps(config.num_steps)],
          "staged_guidance_steps_per_overlap_frame": [
              int(c) for c in long_video.staged_guidance_schedule(
                  config.num_steps, config.overlap, config.staged_guidance).sum(0)],
          "decoder": "per-frame (reference_exact)" if config.reference_exact else (
              "temporal over each clip" if pipe.has_temporal_decoder else "per-frame (image VAE)"),
          "mp4_codec": codec,
          "checkpoint_info": {k: v for k, v in pipe.info.items() if isinstance(v, (str, int, float, bool))},
          "devices": f"{ndev} x {jax.devices()[0].device_kind}",
          "jax_version": jax.__version__,
          "batch_seconds": round(elapsed, 3),
          "load_seconds": round(load_s, 3),
      }
      with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
      records.append(record)
      _log.info("wrote %s.{mp4,gif,json}", stem)
  if bar is not None:
    bar.close()
  return records


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    records = run(flags.FLAGS.config)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"vidrd_jax.sample: error: {e}")
  for r in records:
    print(r["files"]["mp4"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Sampling config file (configs/sample.py).", lock_config=True)
  app.run(main)
