"""VidRD fine-tuning on a TPU v5e-16 slice (16 chips x 16 GiB HBM), launched by run_tpu.sh.

  ./run_tpu.sh --accelerator=v5litepod-16 --bucket=gs://my-bucket -- \
      python -m vidrd_jax.train --config=configs/tpu_v5e.py --workdir=gs://my-bucket/runs/vidrd5e \
      --config.init_from=gs://my-bucket/sd21_base_vidrd_converted

16 GiB per chip: FSDP over all chips, remat, bf16, and pre-encoded latents (packed shards
written by the data tools) so the VAE encoder does not share the step's memory. Batch 32
(2 per chip) with 2 micro-batches per step.
"""

from vidrd_jax.train_config import base_config


def get_config():
  config = base_config()
  config.init_from = ""  # required
  config.distributed = True
  config.model.unet = "sd21_base"
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "float32"
  config.model.attention_impl = "splash"
  config.model.remat = True
  config.trainable = "paper"
  config.data.frames = 8
  config.data.resolution = 256
  config.data.sources = [
      {"kind": "packed", "path": "gs://my-bucket/webvid_latents_256x8", "weight": 1.0},
  ]
  config.data.latents = True
  config.data.worker_count = 8
  config.global_batch_size = 32
  config.grad_accum_steps = 2
  config.num_steps = 200_000
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 2000
  config.ema_decay = 0.9999
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.log_every = 100
  config.checkpoint_every = 2000
  config.sample_every = 10_000
  config.sample_prompts = ("wood on fire", "a boat is sailing in a lake")
  return config
