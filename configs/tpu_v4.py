"""VidRD fine-tuning on a TPU v4-32 pod slice (16 chips, 4 hosts), launched by run_tpu.sh.

  ./run_tpu.sh --accelerator=v4-32 --bucket=gs://my-bucket -- \
      python -m vidrd_jax.train --config=configs/tpu_v4.py --workdir=gs://my-bucket/runs/vidrd \
      --config.init_from=gs://my-bucket/sd21_base_vidrd_converted

FSDP over all 16 chips (parameters, EMA and Adam moments sharded), batch 64 (4 per chip),
bf16 compute with float32 master weights, remat, Pallas flash attention. 256x256, 8 frames.
"""

from vidrd_jax.train_config import base_config


def get_config():
  config = base_config()
  config.init_from = ""  # required: a converted SD2.1 + VidRD pipeline dir (gs:// works)
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
      {"kind": "captioned", "path": "gs://my-bucket/webvid/train.csv", "weight": 0.7},
      {"kind": "images", "path": "gs://my-bucket/laion_subset/train.jsonl", "weight": 0.3},
  ]
  config.data.worker_count = 16
  config.global_batch_size = 64
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
