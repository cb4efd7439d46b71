"""Temporal VAE decoder fine-tuning of the tiny VAE on synthetic videos (CPU, minutes).

  python -m vidrd_jax.train_vae --config=configs/vae_tiny_cpu.py --workdir=/tmp/vidrd_vae_tiny
"""

from vidrd_jax.train_config import vae_base_config


def get_config():
  config = vae_base_config()
  config.model.vae = "tiny"
  config.data.frames = 8
  config.data.resolution = 32
  config.data.sources = [{"kind": "synthetic", "num_records": 4096, "weight": 1.0}]
  config.num_steps = 200
  config.global_batch_size = 4
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10
  config.optimizer.weight_decay = 0.0
  config.loss.disc_start = 100
  config.loss.disc_channels = 32
  config.loss.disc_layers = 2
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.log_every = 10
  config.checkpoint_every = 100
  return config
