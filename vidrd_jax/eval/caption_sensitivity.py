"""How much a trained denoiser uses each word of its captions.

Sampled videos can fail to show a captioned attribute for two different reasons: the model
never learned to read the word, or it reads it but sampling does not carry it through. This
module separates them by measuring the training objective itself: the denoising loss on real
clips with their true captions, against the same clips, noise and timesteps with one
attribute's word swapped for another value. A word the model uses raises the loss when it is
wrong; a word it ignores leaves the loss unchanged to the last digit.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TIMESTEPS = (100, 300, 500, 700, 850, 950)


def denoising_loss(pipe, latents: np.ndarray, captions: Sequence[str],
                   timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0,
                   batch_size: int = 32) -> np.ndarray:
  """Per-timestep mean squared error of the UNet's training target.

  Args:
    pipe: a ``vidrd_jax.pipeline.Pipeline``; its scheduler's ``prediction_type`` picks the
      target (epsilon or v).
    latents: clean latents [B, F, h, w, C] in diffusion space (``pipe.encode_frames``).
    captions: B captions, one per clip.
    timesteps: training timesteps to evaluate at.
    seed: the noise; the same seed gives the same noise for any captions.
    batch_size: clips per UNet call.

  Returns:
    float64 [len(timesteps)]: the loss at each timestep, averaged over clips and elements.
  """
  latents = jnp.asarray(latents, jnp.float32)
  if latents.ndim != 5:
    raise ValueError(f"latents must be [B, F, h, w, C], got shape {latents.shape}")
  if len(captions) != latents.shape[0]:
    raise ValueError(f"{latents.shape[0]} clips but {len(captions)} captions")
  sched = pipe.scheduler
  ctx = pipe.encode_prompt(list(captions))
  key = jax.random.PRNGKey(seed)
  out = []
  for t in timesteps:
    noise = jax.random.normal(jax.random.fold_in(key, int(t)), latents.shape, jnp.float32)
    tt = jnp.full((latents.shape[0],), int(t), jnp.int32)
    noisy = sched.add_noise(latents, noise, tt)
    if pipe.prediction_type == "v_prediction":
      target = sched.get_velocity(latents, noise, tt)
    else:
      target = noise
    total = 0.0
    for i in range(0, latents.shape[0], batch_size):
      pred = pipe.apply_unet(noisy[i:i + batch_size], tt[i:i + batch_size], ctx[i:i + batch_size])
      total += float(jnp.sum(jnp.square(pred.astype(jnp.float32) - target[i:i + batch_size])))
    out.append(total / target.size)
  return np.asarray(out, np.float64)


def attribute_sensitivity(pipe, latents: np.ndarray, attributes: Sequence[Mapping[str, Any]],
                          vocabularies: Mapping[str, Sequence[str]],
                          make_caption: Callable[[Mapping[str, Any]], str],
                          timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                          seed: int = 0) -> dict[str, Any]:
  """Loss increase when one attribute's word is wrong, for each attribute.

  Each clip's attribute value is replaced by the next value of its vocabulary (cyclically), so
  every swapped caption names a value the model saw in training.

  Args:
    pipe: the trained pipeline.
    latents: clean latents [B, F, h, w, C] of real clips.
    attributes: per clip, its attributes (e.g. ``{"color": "red", "shape": ..., ...}``).
    vocabularies: attribute name -> its values (at least two each).
    make_caption: attributes -> caption, as in training.
    timesteps, seed: as in ``denoising_loss``.

  Returns:
    ``{"timesteps": [...], "loss": [...] (true captions), "swapped_loss": {attr: [...]},
    "relative_increase": {attr: mean over timesteps of swapped / true - 1}}``.
  """
  if len(attributes) != len(latents):
    raise ValueError(f"{len(latents)} clips but {len(attributes)} attribute records")
  for name, values in vocabularies.items():
    if len(values) < 2:
      raise ValueError(f"attribute {name!r} needs at least two values to swap, got {list(values)}")
  swaps = {}
  for name, values in vocabularies.items():
    values = list(values)
    for a in attributes:
      if a[name] not in values:
        raise ValueError(f"attribute {name!r} value {a[name]!r} is not in its vocabulary {values}")
    swaps[name] = [{**a, name: values[(values.index(a[name]) + 1) % len(values)]}
                   for a in attributes]
  true = denoising_loss(pipe, latents, [make_caption(a) for a in attributes], timesteps, seed)
  swapped, increase = {}, {}
  for name, wrong in swaps.items():
    loss = denoising_loss(pipe, latents, [make_caption(a) for a in wrong], timesteps, seed)
    swapped[name] = loss.tolist()
    increase[name] = float(np.mean(loss / true - 1.0))
  return {"timesteps": [int(t) for t in timesteps], "loss": true.tolist(),
          "swapped_loss": swapped, "relative_increase": increase}
