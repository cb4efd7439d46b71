"""Long-video sampling with the VidRD reference's inference settings.

  python -m vidrd_jax.sample --config=configs/sample.py --config.checkpoint=DIR --config.prompt="wood on fire"

Every field can be overridden with --config.<name>=...; the JSON sidecar of each video records
the values used.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.checkpoint = ""          # required: a converted / trained pipeline directory
  config.prompt = ""              # one prompt, and/or:
  config.prompts_file = ""        # .txt (one prompt per line) or .json (list of strings)
  config.negative_prompt = "watermark"
  config.output_dir = "samples"

  # Long video: K clips of N frames; M overlap frames, PNS alpha, DSG beta (reference defaults).
  config.num_clips = 1
  config.frames_per_clip = 8
  config.overlap = 4
  config.noise_recycle = 4.0
  config.staged_guidance = 0.4
  config.noise_alpha = 0.0        # progressive frame-correlated first-clip noise (0: off)

  # DDIM and guidance.
  config.num_steps = 50
  config.guidance_scale = 10.0
  config.eta = 0.0
  config.seed = 0

  # 0: the size the checkpoint was trained at (vidrd_jax.train exports record it), else the
  # reference's 256x256.
  config.height = 0
  config.width = 0
  config.fps = 8.0
  # Decode each frame alone, as the released reference does (default: temporal VAE over each clip).
  config.reference_exact = False

  # Execution.
  config.batch_size = 0           # prompts per batch; 0: one per device
  config.dtype = ""               # compute dtype: "" (bf16 on GPU/TPU, float32 on CPU), float32, bfloat16, float16
  config.attention_impl = ""      # "" (auto), xla, cudnn, splash
  config.progress = True          # tqdm bar over clips x steps
  config.distributed = "auto"     # jax.distributed.initialize(): auto (multi-host env), true, false
  return config
