"""VidRD fine-tuning of converted SD2.1-base on one 80 GB GPU (H100 / A100).

  python -m vidrd_jax.train --config=configs/gpu.py --workdir=/data/runs/vidrd \
      --config.init_from=/data/sd21_base_vidrd_converted

Model: SD2.1-base UNet + VidRD temporal layers from a converted checkpoint (weight_conversion);
paper trainable set (temporal layers + spatial transformer blocks), bf16 compute with float32
master weights, remat, cuDNN flash attention. Data: a WebVid-style manifest mixed with
pseudo-videos from images (edit ``data.sources``). 256x256, 8 frames (32x32 latents).
"""

from vidrd_jax.train_config import base_config


def get_config():
  config = base_config()
  config.init_from = ""  # required: --config.init_from=<converted pipeline dir>
  config.model.unet = "sd21_base"
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "float32"
  config.model.attention_impl = "cudnn"
  config.model.remat = True
  config.trainable = "paper"
  config.data.frames = 8
  config.data.resolution = 256
  config.data.sources = [
      {"kind": "captioned", "path": "/data/webvid/train.csv", "weight": 0.8},
      {"kind": "images", "path": "/data/images/train.jsonl", "weight": 0.2},
  ]
  config.data.worker_count = 8
  config.global_batch_size = 8
  config.grad_accum_steps = 1
  config.num_steps = 100_000
  config.optimizer.learning_rate = 5e-5
  config.optimizer.warmup_steps = 1000
  config.ema_decay = 0.9999
  config.mesh.data = 1
  config.mesh.fsdp = 1
  config.log_every = 50
  config.checkpoint_every = 1000
  config.sample_every = 5000
  config.sample_prompts = ("wood on fire", "a boat is sailing in a lake")
  return config
