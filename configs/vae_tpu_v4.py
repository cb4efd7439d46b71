"""Temporal VAE decoder fine-tuning from converted SD2.1 on a TPU v4-32 slice.

  ./run_tpu.sh --accelerator=v4-32 --bucket=gs://my-bucket -- \
      python -m vidrd_jax.train_vae --config=configs/vae_tpu_v4.py \
      --workdir=gs://my-bucket/runs/vae --config.init_from=gs://my-bucket/sd21_base_converted

Starts from SD2.1's image VAE (temporal convs added, zero-initialised, so step 0 decodes exactly
like SD2.1); only the decoder's temporal convs train. 256x256 clips of 8 frames, batch 32.
"""

from vidrd_jax.train_config import vae_base_config


def get_config():
  config = vae_base_config()
  config.init_from = ""  # required: converted SD2.1 pipeline dir
  config.distributed = True
  config.model.dtype = "bfloat16"
  config.data.frames = 8
  config.data.resolution = 256
  config.data.sources = [
      {"kind": "captioned", "path": "gs://my-bucket/webvid/train.csv", "weight": 1.0},
  ]
  config.data.worker_count = 16
  config.global_batch_size = 32
  config.num_steps = 50_000
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 500
  config.loss.disc_start = 5000
  config.loss.disc_weight = 0.5
  config.loss.kl_weight = 1e-6
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.log_every = 100
  config.checkpoint_every = 2000
  return config
