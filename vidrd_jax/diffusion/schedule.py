"""Noise schedule and the DDIM sampler step, equal to diffusers' ``DDIMScheduler``.

The schedule is a small frozen (hashable) dataclass built from the scheduler config dict a
Stable Diffusion checkpoint ships (``scheduler/scheduler_config.json``), so it can be a static
argument of ``jax.jit``. Everything that changes during sampling (the timestep, eta, the noise)
is an array, so one compiled program serves every step and every eta.

SD2.1-base uses ``scaled_linear`` betas from 0.00085 to 0.012 over 1000 steps, epsilon
prediction, ``steps_offset=1``, ``set_alpha_to_one=False`` and "leading" timestep spacing:
50 steps visit t = 981, 961, ..., 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Keys a diffusers scheduler config may carry that do not change DDIM sampling.
_IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "skip_prk_steps", "variance_type", "dynamic_thresholding_ratio",
    "clip_sample_range_max", "timestep_type", "use_karras_sigmas", "interpolation_type", "sigma_min",
    "sigma_max", "final_sigmas_type", "lower_order_final", "solver_order", "solver_type", "algorithm_type",
    "euler_at_final", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas", "sample_max_value",
})


class DDIMOutput(NamedTuple):
  prev_sample: jax.Array            # x_{t-1}, same shape as the sample
  pred_original_sample: jax.Array   # the model's estimate of x_0


@dataclasses.dataclass(frozen=True)
class DDIMScheduler:
  """DDIM (Song et al. 2021) over a discrete DDPM noise schedule, as diffusers defines it.

  Attributes mirror the diffusers ``DDIMScheduler`` config of the same names.
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: Optional[Tuple[float, ...]] = None
  prediction_type: str = "epsilon"
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  timestep_spacing: str = "leading"
  rescale_betas_zero_snr: bool = False

  def __post_init__(self):
    if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type {self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
    if self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise ValueError(
          f"timestep_spacing {self.timestep_spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}")
    if self.num_train_timesteps < 1:
      raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "DDIMScheduler":
    """Builds the scheduler from a diffusers scheduler config dict (any scheduler class).

    Unknown keys that affect sampling raise; bookkeeping keys (``_class_name``, ...) are ignored.
    ``thresholding=True`` (dynamic thresholding, used by pixel-space models) is not supported.
    """
    config = {**dict(config), **overrides}
    if config.pop("thresholding", False):
      raise ValueError("scheduler config asks for dynamic thresholding, which this DDIM sampler does not support")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    unknown = []
    for key, value in config.items():
      if key in fields:
        kwargs[key] = value
      elif key not in _IGNORED_KEYS:
        unknown.append(key)
    if unknown:
      raise ValueError(f"scheduler config has keys this DDIM sampler does not understand: {sorted(unknown)}")
    if kwargs.get("trained_betas") is not None:
      kwargs["trained_betas"] = tuple(float(b) for b in np.asarray(kwargs["trained_betas"]).reshape(-1))
    return cls(**kwargs)

  def to_config(self) -> dict:
    """The diffusers-style config dict (JSON-serialisable)."""
    config = dataclasses.asdict(self)
    if config["trained_betas"] is not None:
      config["trained_betas"] = list(config["trained_betas"])
    return config

  # ---------------------------------------------------------------------------------------------
  # Schedule tables (NumPy, computed on the host once; constants inside jit).

  def betas(self) -> np.ndarray:
    """Betas [T] float32, computed in float32 the way diffusers does (torch.linspace in float32)."""
    t = self.num_train_timesteps
    if self.trained_betas is not None:
      betas = np.asarray(self.trained_betas, np.float32)
    elif self.beta_schedule == "linear":
      betas = np.linspace(self.beta_start, self.beta_end, t).astype(np.float32)
    elif self.beta_schedule == "scaled_linear":
      # Linear in sqrt(beta), squared in float32 (LDM's schedule as diffusers writes it).
      betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, t).astype(np.float32) ** 2
    else:  # squaredcos_cap_v2 (Nichol & Dhariwal's cosine schedule), capped at 0.999.
      def alpha_bar(x):
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
      betas = np.asarray(
          [min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)], np.float32)
    if self.rescale_betas_zero_snr:
      betas = _rescale_zero_terminal_snr(betas)
    return betas

  def alphas_cumprod(self) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), [T] float32 (sequential float32 product, as torch.cumprod)."""
    return np.cumprod(1.0 - self.betas(), dtype=np.float32)

  def final_alpha_cumprod(self) -> np.float32:
    """alpha_bar used after the last step: 1 with set_alpha_to_one, else alpha_bar_0."""
    return np.float32(1.0) if self.set_alpha_to_one else self.alphas_cumprod()[0]

  def timesteps(self, num_steps: int) -> np.ndarray:
    """The S timesteps DDIM visits, noisiest first, int32 [S] (diffusers' ``set_timesteps``)."""
    t = self.num_train_timesteps
    if not 1 <= num_steps <= t:
      raise ValueError(f"num_steps must be in [1, {t}] (num_train_timesteps), got {num_steps}")
    if self.timestep_spacing == "linspace":
      ts = np.linspace(0, t - 1, num_steps).round()[::-1]
    elif self.timestep_spacing == "leading":
      ts = (np.arange(0, num_steps) * (t // num_steps)).round()[::-1] + self.steps_offset
    else:  # trailing
      ts = np.round(np.arange(t, 0, -t / num_steps)) - 1
    return ts.astype(np.int32)

  def step_offset(self, num_steps: int) -> int:
    """How far back each DDIM step jumps: prev_t = t - T // S (diffusers uses this for every spacing)."""
    return self.num_train_timesteps // num_steps

  # ---------------------------------------------------------------------------------------------
  # The step (jnp, jit-friendly: timestep, eta and noise may all be traced).

  def alpha_pair(self, timestep: jax.Array, num_steps: int) -> Tuple[jax.Array, jax.Array]:
    """(alpha_bar_t, alpha_bar_prev) for integer timesteps of any shape (traced or not)."""
    table = jnp.asarray(self.alphas_cumprod())
    timestep = jnp.asarray(timestep, jnp.int32)
    prev = timestep - self.step_offset(num_steps)
    alpha_t = table[timestep]
    # Past the chain's start there is no alpha_bar_prev: use the final one.
    alpha_prev = jnp.where(prev >= 0, table[jnp.maximum(prev, 0)], jnp.asarray(self.final_alpha_cumprod()))
    return alpha_t, alpha_prev

  def step(
      self,
      model_output: jax.Array,
      timestep: jax.Array,
      sample: jax.Array,
      num_steps: int,
      eta: jax.Array | float = 0.0,
      noise: Optional[jax.Array] = None,
      key: Optional[jax.Array] = None,
  ) -> DDIMOutput:
    """One DDIM update x_t -> x_{t-1} (diffusers ``DDIMScheduler.step``).

    Args:
      model_output: the UNet output at ``timestep`` (epsilon, v or x_0 per ``prediction_type``).
      timestep: integer timestep, a scalar (or broadcastable to the sample's leading axes).
      sample: x_t, any shape.
      num_steps: the number of inference steps S (fixes the jump T // S).
      eta: DDIM's eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral sampling.
      noise: standard-normal noise of the sample's shape for eta > 0 (diffusers' ``variance_noise``).
      key: alternatively a PRNG key to draw that noise from.

    Returns:
      DDIMOutput(prev_sample, pred_original_sample), float32 math in the sample's dtype.
    """
    if noise is not None and key is not None:
      raise ValueError("pass either noise or key to DDIMScheduler.step, not both")
    if noise is None and key is None and isinstance(eta, (int, float)) and eta > 0:
      raise ValueError("eta > 0 needs noise: pass noise= (standard normal, sample shape) or key=")
    dtype = sample.dtype
    alpha_t, alpha_prev = self.alpha_pair(timestep, num_steps)
    alpha_t = _expand_to(alpha_t.astype(dtype), sample.ndim)
    alpha_prev = _expand_to(alpha_prev.astype(dtype), sample.ndim)
    beta_t = 1 - alpha_t

    # Both x_0 and epsilon estimates from the model output, whatever it predicts.
    if self.prediction_type == "epsilon":
      pred_x0 = (sample - beta_t**0.5 * model_output) / alpha_t**0.5
      pred_eps = model_output
    elif self.prediction_type == "v_prediction":
      pred_x0 = alpha_t**0.5 * sample - beta_t**0.5 * model_output
      pred_eps = alpha_t**0.5 * model_output + beta_t**0.5 * sample
    else:  # sample
      pred_x0 = model_output
      pred_eps = (sample - alpha_t**0.5 * pred_x0) / beta_t**0.5
    if self.clip_sample:
      pred_x0 = jnp.clip(pred_x0, -self.clip_sample_range, self.clip_sample_range)

    # sigma_t of DDIM eq. (16), scaled by eta.
    beta_prev = 1 - alpha_prev
    variance = (beta_prev / beta_t) * (1 - alpha_t / alpha_prev)
    std_dev = jnp.asarray(eta, dtype) * variance**0.5
    direction = (1 - alpha_prev - std_dev**2) ** 0.5 * pred_eps
    prev_sample = alpha_prev**0.5 * pred_x0 + direction
    if key is not None:
      noise = jax.random.normal(key, sample.shape, dtype)
    if noise is not None:
      prev_sample = prev_sample + std_dev * noise.astype(dtype)
    return DDIMOutput(prev_sample, pred_x0)

  # ---------------------------------------------------------------------------------------------
  # Forward process, for training and for tests.

  def add_noise(self, original: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps; timesteps [B]."""
    alpha = _expand_to(jnp.asarray(self.alphas_cumprod())[timesteps].astype(original.dtype), original.ndim)
    return alpha**0.5 * original + (1 - alpha) ** 0.5 * noise

  def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0; timesteps [B]."""
    alpha = _expand_to(jnp.asarray(self.alphas_cumprod())[timesteps].astype(sample.dtype), sample.ndim)
    return alpha**0.5 * noise - (1 - alpha) ** 0.5 * sample


def _expand_to(x: jax.Array, ndim: int) -> jax.Array:
  # A scalar stays a scalar; per-batch [B] values broadcast over the trailing sample axes.
  x = jnp.asarray(x)
  return x.reshape(x.shape + (1,) * (ndim - x.ndim)) if x.ndim else x


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  # Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has zero SNR.
  alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
  first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
  alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
  alphas_bar = alphas_bar_sqrt**2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return (1 - alphas).astype(np.float32)
