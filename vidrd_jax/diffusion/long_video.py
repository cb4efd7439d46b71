"""VidRD long-video sampling: DDIM with classifier-free guidance, FNR, PNS and DSG.

A long video is K clips of N frames. Clip 0 is ordinary text-to-video DDIM sampling. Every
later clip i reuses the previous clip (``shared/design.md``, "Long-video sampling"):

* Frame-level Noise Reversion (FNR): its first M ("overlap") frames start from the previous
  clip's initial noise in reverse frame order, z_T[i, j] = z_T[i-1, N-1-j] for j < M.
* Past-dependent Noise Sampling (PNS): the other frames mix that reversed noise with fresh
  noise e ~ N(0, I), z_T[i, j] = alpha/sqrt(1+alpha^2) z_T[i-1, N-1-j] + e/sqrt(1+alpha^2).
* Denoising with Staged Guidance (DSG): at DDIM step s (s = 0 is the noisiest) frame j < M
  is overwritten with the previous clip's frame N-1-j at the same step while
  s < (M - j) (S / M) beta, so frame 0 follows the previous clip longest.

This follows the authors' released code (``model/pipeline.py``), including its quirks: the
overlap frames are generated again and kept, so the output has K*N frames; the trajectory
stored for DSG is taken after the DSG overwrite and before the UNet call. Where the paper's
notation and the code could be read differently, the code wins (the released weights were
tuned with it); the one formula where they do differ, the progressive first-clip noise,
offers both forms (:func:`progressive_noise`).

Execution: one clip's S steps are one ``lax.scan`` inside one ``jit``; CFG is one UNet call
on the interleaved [uncond, cond] batch; guidance scale, eta, alpha, the DSG schedule and the
previous clip's trajectory are all arguments, so K clips (and any settings that keep shapes)
reuse one compiled program. Prompts are sharded over the ``data`` (and ``fsdp``) axes of the
device mesh, padded to the shard count and un-padded on return; prompt b's noise comes from
fold_in(key(seed), prompt_ids[b]), so a video does not depend on its batch or the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vidrd_jax.diffusion.schedule import DDIMScheduler
from vidrd_jax.parallel import sharding as sharding_lib

PyTree = Any
# eps_fn(params, latents [B', F, h, w, C], timesteps [B'], context [B', L, D]) -> [B', F, h, w, C]:
# the denoiser's raw output (epsilon, v or x_0, whatever the scheduler's prediction_type says).
EpsFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]

DATA_AXIS = "data"
FRAME_AXIS = 1  # video latents are [B, F, h, w, C]


# =================================================================================================
# The paper's pieces, as pure functions.


def flip_frames(x: jax.Array) -> jax.Array:
  """Reverses the frame axis of [B, F, ...] latents."""
  return jnp.flip(x, axis=FRAME_AXIS)


def progressive_noise(normals: jax.Array, noise_alpha: float | jax.Array,
                      reference_exact: bool = True) -> jax.Array:
  """First-clip noise with the progressive frame correlation of PYoCo (arXiv 2305.10474, Sec. 4).

  eps_0 = n_0 and eps_j = a/sqrt(1+a^2) eps_{j-1} + sigma n_j for standard normals n_j.
  PYoCo's prior (``reference_exact=False``) uses sigma = 1/sqrt(1+a^2), which keeps every
  frame unit-variance. The VidRD reference passes 1/(1+a^2) as the *standard deviation*
  (``randn_progressive`` in its ``model/utils.py``), so its later frames have variance below 1
  when a > 0; ``reference_exact=True`` (the default) reproduces that. Both give plain i.i.d.
  noise for a = 0.

  Args:
    normals: standard-normal draws [B, N, h, w, C].
    noise_alpha: the correlation strength a >= 0.
    reference_exact: the reference's sigma = 1/(1+a^2) (True) or PYoCo's 1/sqrt(1+a^2).

  Returns:
    [B, N, h, w, C] noise, dtype of ``normals``.
  """
  a = jnp.asarray(noise_alpha, jnp.float32)
  carry_coef = (a / jnp.sqrt(1 + a**2)).astype(normals.dtype)
  sigma = (1 / (1 + a**2) if reference_exact else 1 / jnp.sqrt(1 + a**2)).astype(normals.dtype)

  # A first-order recursion over frames: a scan keeps the program size independent of N.
  def body(prev, n):
    cur = carry_coef * prev + sigma * n
    return cur, cur

  frames = jnp.moveaxis(normals, FRAME_AXIS, 0)
  _, rest = jax.lax.scan(body, frames[0], frames[1:])
  return jnp.moveaxis(jnp.concatenate([frames[:1], rest], axis=0), 0, FRAME_AXIS)


def frame_noise_reversion(prev_noise: jax.Array, overlap: int) -> jax.Array:
  """FNR: the first M frames' initial noise, the previous clip's noise reversed in time.

  Args:
    prev_noise: z_T of clip i-1, [B, N, h, w, C].
    overlap: M.

  Returns:
    [B, M, h, w, C] with frame j = prev_noise[:, N-1-j].
  """
  return flip_frames(prev_noise)[:, :overlap]


def past_dependent_noise(prev_noise: jax.Array, fresh_normals: jax.Array, overlap: int,
                         noise_recycle: float | jax.Array) -> jax.Array:
  """PNS: initial noise of frames j >= M, recycling the previous clip's reversed noise.

  z_T[i, j] = alpha/sqrt(1+alpha^2) z_T[i-1, N-1-j] + e_j/sqrt(1+alpha^2), e_j ~ N(0, I):
  unit variance for any alpha; alpha = 0 is fresh noise, large alpha nearly repeats the past.

  Args:
    prev_noise: z_T of clip i-1, [B, N, h, w, C].
    fresh_normals: standard-normal draws of the full clip shape [B, N, h, w, C] (frames j < M
      are ignored, as in the reference, which also draws the full shape).
    overlap: M.
    noise_recycle: alpha >= 0.

  Returns:
    [B, N - M, h, w, C].
  """
  a = jnp.asarray(noise_recycle, jnp.float32)
  keep = (a / jnp.sqrt(1 + a**2)).astype(prev_noise.dtype)
  fresh_std = (1 / jnp.sqrt(1 + a**2)).astype(prev_noise.dtype)
  return keep * flip_frames(prev_noise)[:, overlap:] + fresh_normals[:, overlap:] * fresh_std


def next_clip_noise(prev_noise: jax.Array, fresh_normals: jax.Array, overlap: int,
                    noise_recycle: float | jax.Array) -> jax.Array:
  """FNR for frames j < M and PNS for frames j >= M: z_T of clip i > 0, [B, N, h, w, C]."""
  return jnp.concatenate([
      frame_noise_reversion(prev_noise, overlap),
      past_dependent_noise(prev_noise, fresh_normals, overlap, noise_recycle),
  ], axis=FRAME_AXIS)


def staged_guidance_schedule(num_steps: int, overlap: int, strength: float) -> np.ndarray:
  """DSG's stages: mask[s, j] is True when frame j < M is overwritten at step s.

  Frame j is guided while s < (M - j) (S / M) beta, evaluated in float64 exactly as the
  reference writes it. In the paper's words the S steps are split into M stages of S/M steps
  and, scaled by beta, frame j follows the past for the first M - j of them: the frame next to
  the previous clip the longest, the last overlap frame the shortest. beta = 0 turns DSG off,
  beta = 1 guides frame 0 through every step.

  Returns:
    bool [S, M] (host array: it becomes an argument, so changing beta does not recompile).
  """
  mask = np.zeros((num_steps, overlap), bool)
  for j in range(overlap):
    for s in range(num_steps):
      mask[s, j] = s < (overlap - j) * (num_steps / overlap) * strength
  return mask


def staged_guidance(latents: jax.Array, past: jax.Array, mask: jax.Array) -> jax.Array:
  """DSG at one step: frames j < M of ``latents`` take ``past``'s frame j where ``mask[j]``.

  Args:
    latents: z_s of the current clip, [B, N, h, w, C].
    past: the previous clip's reversed latents at the same step, frames j < M: [B, M, h, w, C].
    mask: bool [M], this step's row of :func:`staged_guidance_schedule`.
  """
  overlap = past.shape[FRAME_AXIS]
  head = jnp.where(mask[None, :, None, None, None], past, latents[:, :overlap])
  return jnp.concatenate([head, latents[:, overlap:]], axis=FRAME_AXIS)


# =================================================================================================
# One clip: the jitted DDIM scan.


class ClipResult(NamedTuple):
  latents: jax.Array     # z_0 [B, N, h, w, C]
  trajectory: jax.Array  # [S, B, R, h, w, C]: flip_frames(z_s)[:, :R] before each UNet call (after DSG)


@dataclasses.dataclass(frozen=True)
class ClipSampler:
  """Static description of the per-clip program (hashable; one compiled program per value).

  Attributes:
    eps_fn: the denoiser (see ``EpsFn``); must be hashable and stable across calls (a
      module-level function or a frozen dataclass), or every call recompiles.
    scheduler: the DDIM schedule.
    num_steps: S.
    use_cfg: classifier-free guidance (diffusers does it when guidance_scale > 1).
    stochastic: eta > 0 (draws per-step noise; eta itself stays a traced argument).
    record_frames: how many reversed frames of each z_s to return (M for the next clip's DSG;
      N to inspect the whole trajectory).
    progress_every: call the host progress hook with the number of steps done after every
      ``progress_every`` steps and after the last one (``jax.debug.callback``); 0: never.
  """
  eps_fn: EpsFn
  scheduler: DDIMScheduler
  num_steps: int
  use_cfg: bool = True
  stochastic: bool = False
  record_frames: int = 0
  progress_every: int = 0

  def step_body(self, params, context, guidance_scale, eta, step_keys, clip_index, latents, xs):
    """One DDIM step with DSG and CFG; shared by the scan and the Python loop."""
    s, t, past_s, mask_s = xs
    latents = staged_guidance(latents, past_s[:, :mask_s.shape[0]], mask_s)
    record = flip_frames(latents)[:, :self.record_frames]
    b = latents.shape[0]
    if self.use_cfg:
      # Interleave [uncond_b, cond_b] per prompt so a data-sharded batch stays device-local.
      model_in = jnp.repeat(latents, 2, axis=0)
      ctx = context.reshape((2 * b,) + context.shape[2:])
    else:
      model_in, ctx = latents, context[:, -1]
    timesteps = jnp.full((model_in.shape[0],), t, jnp.int32)
    # Guidance and the DDIM update in the latents' dtype (float32), whatever the UNet computes in.
    out = self.eps_fn(params, model_in, timesteps, ctx).astype(latents.dtype)
    if self.use_cfg:
      out = out.reshape((b, 2) + out.shape[1:])
      uncond, cond = out[:, 0], out[:, 1]
      out = uncond + guidance_scale.astype(out.dtype) * (cond - uncond)
    noise = None
    if self.stochastic:
      # One key per prompt: the noise does not depend on batch composition or sharding.
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, s), latents.shape[1:],
                                                   latents.dtype))(step_keys)
    latents = self.scheduler.step(out, t, latents, self.num_steps, eta, noise).prev_sample
    if self.progress_every:
      # A host round trip per report: only every few steps, so it does not slow sampling.
      done = s + 1
      report = (done % self.progress_every == 0) | (done == self.num_steps)
      jax.lax.cond(report, lambda: jax.debug.callback(_progress_tick, clip_index, done), lambda: None)
    return latents, record

  def xs(self, past: jax.Array, dsg_mask: jax.Array):
    steps = jnp.arange(self.num_steps, dtype=jnp.int32)
    timesteps = jnp.asarray(self.scheduler.timesteps(self.num_steps))
    return steps, timesteps, past, dsg_mask


@functools.partial(jax.jit, static_argnames=("sampler",))
def denoise_clip(sampler: ClipSampler, params: PyTree, init_latents: jax.Array, context: jax.Array,
                 guidance_scale: jax.Array, eta: jax.Array, past: jax.Array, dsg_mask: jax.Array,
                 step_keys: jax.Array, clip_index: jax.Array) -> ClipResult:
  """Denoises one clip from z_T with DDIM + CFG + DSG, as one ``lax.scan`` over the S steps.

  Args:
    sampler: the static program description.
    params: denoiser parameters.
    init_latents: z_T [B, N, h, w, C].
    context: text embeddings [B, 2, L, D] as (negative prompt, prompt) pairs ([B, 1, L, D]
      without CFG).
    guidance_scale: scalar w; eps = eps_uncond + w (eps_cond - eps_uncond).
    eta: scalar DDIM eta (used when ``sampler.stochastic``).
    past: the previous clip's trajectory, flip_frames(z_s)[:, :M] per step, [S, B, M, h, w, C]
      (anything for the first clip, whose ``dsg_mask`` is all False).
    dsg_mask: bool [S, M] from :func:`staged_guidance_schedule`.
    step_keys: one PRNG key per prompt [B] for eta > 0.
    clip_index: scalar int, passed to the progress hook.

  Returns:
    ClipResult(z_0, trajectory [S, B, record_frames, h, w, C]).
  """
  body = functools.partial(sampler.step_body, params, context, jnp.asarray(guidance_scale, jnp.float32),
                           jnp.asarray(eta, jnp.float32), step_keys, jnp.asarray(clip_index, jnp.int32))
  latents, trajectory = jax.lax.scan(body, init_latents, sampler.xs(past, dsg_mask))
  return ClipResult(latents, trajectory)


@functools.partial(jax.jit, static_argnums=0)
def _step_jit(sampler: ClipSampler, *args):
  return sampler.step_body(*args)


def denoise_clip_loop(sampler: ClipSampler, params, init_latents, context, guidance_scale, eta, past,
                      dsg_mask, step_keys, clip_index) -> ClipResult:
  """:func:`denoise_clip` as a plain Python loop over steps (one jitted step each); for tests."""
  step = functools.partial(_step_jit, sampler)
  xs = sampler.xs(past, dsg_mask)
  latents, records = init_latents, []
  for s in range(sampler.num_steps):
    latents, rec = step(params, context, jnp.asarray(guidance_scale, jnp.float32), jnp.asarray(eta, jnp.float32),
                        step_keys, jnp.asarray(clip_index, jnp.int32), latents, jax.tree.map(lambda x: x[s], xs))
    records.append(rec)
  return ClipResult(latents, jnp.stack(records))


# =================================================================================================
# Progress reporting from inside the compiled scan.

_progress_lock = threading.Lock()
_progress_hook: Optional[Callable[[int, int], None]] = None


def _progress_tick(clip, steps_done) -> None:
  hook = _progress_hook
  if hook is not None:
    hook(int(clip), int(steps_done))


def set_progress_hook(hook: Optional[Callable[[int, int], None]]) -> None:
  """Installs the host function hook(clip, steps_done) that sampling programs report to.

  Only programs built with ``progress_every > 0`` call it; the callback is asynchronous and costs
  one tiny device-to-host transfer per step.
  """
  global _progress_hook
  with _progress_lock:
    _progress_hook = hook


# =================================================================================================
# K clips.


class LongVideoLatents(NamedTuple):
  latents: jax.Array        # [B, K, N, h, w, C] final latents of every clip
  initial_noise: jax.Array  # [B, K, N, h, w, C] z_T of every clip
  trajectories: Optional[jax.Array]  # [B, K, S, R, h, w, C] when requested, else None


def _prompt_keys(seed: int, prompt_ids: np.ndarray) -> jax.Array:
  # Prompt b's stream is fold_in(key(seed), id_b): independent of batch size, padding and devices.
  root = jax.random.key(seed)
  return jax.vmap(lambda b: jax.random.fold_in(root, b))(jnp.asarray(prompt_ids, jnp.uint32))


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _draw_normals(keys: jax.Array, tag: jax.Array, shape: tuple, dtype) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, tag), shape, dtype))(keys)


_progressive_noise_jit = jax.jit(progressive_noise, static_argnames=("reference_exact",))
_next_clip_noise_jit = jax.jit(next_clip_noise, static_argnames=("overlap",))


def validate_long_video_args(num_clips: int, frames_per_clip: int, overlap: int, noise_recycle: float,
                             staged_guidance_strength: float, noise_alpha: float, num_steps: int,
                             eta: float) -> None:
  """Raises ValueError naming the first bad long-video setting."""
  if num_clips < 1:
    raise ValueError(f"num_clips must be >= 1, got {num_clips}")
  if frames_per_clip < 1:
    raise ValueError(f"frames_per_clip must be >= 1, got {frames_per_clip}")
  if not 0 <= overlap < frames_per_clip:
    raise ValueError(f"overlap M must satisfy 0 <= M < frames_per_clip ({frames_per_clip}), got {overlap}")
  if not noise_recycle >= 0 or not math.isfinite(noise_recycle):
    raise ValueError(f"noise_recycle alpha must be a finite number >= 0, got {noise_recycle}")
  if not 0.0 <= staged_guidance_strength <= 1.0:
    raise ValueError(f"staged_guidance beta must be in [0, 1], got {staged_guidance_strength}")
  if not noise_alpha >= 0 or not math.isfinite(noise_alpha):
    raise ValueError(f"noise_alpha must be a finite number >= 0, got {noise_alpha}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if not eta >= 0:
    raise ValueError(f"eta must be >= 0, got {eta}")


def make_data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over all (or the given) devices with the batch axis ``data``."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_axes(mesh: Mesh) -> tuple[tuple[str, ...], int]:
  """The mesh axes prompts are sharded over and how many shards that makes."""
  names, shards = sharding_lib.data_parallel_axes(mesh)
  if not names:
    raise ValueError(f"mesh axes {mesh.axis_names} include none of {sharding_lib.BATCH_AXES} to "
                     f"shard prompts over")
  return names, shards


def _put(x: Any, mesh: Mesh, spec: P) -> jax.Array:
  """Places a value every process holds in full onto ``mesh`` with ``spec``."""
  sharding = NamedSharding(mesh, spec)
  if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
    return jax.device_put(x, sharding)
  # Multi-host: each process fills only its own devices' shards from its full host copy.
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _on_mesh(x: Any, mesh: Mesh) -> bool:
  return isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh


def to_host(x: jax.Array) -> np.ndarray:
  """Fetches a (possibly multi-host) global array whole onto every host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def sample_long_video(
    eps_fn: EpsFn,
    params: PyTree,
    scheduler: DDIMScheduler,
    context: jax.Array | np.ndarray,
    negative_context: Optional[jax.Array | np.ndarray] = None,
    *,
    latent_shape: tuple[int, int, int],
    num_clips: int = 1,
    frames_per_clip: int = 8,
    overlap: int = 4,
    noise_recycle: float = 4.0,
    staged_guidance_strength: float = 0.4,
    noise_alpha: float = 0.0,
    num_steps: int = 50,
    guidance_scale: float = 10.0,
    eta: float = 0.0,
    seed: int = 0,
    prompt_ids: Optional[Sequence[int]] = None,
    init_latents: Optional[jax.Array | np.ndarray] = None,
    clip_noise: Optional[jax.Array | np.ndarray] = None,
    progressive_reference_exact: bool = True,
    mesh: Optional[Mesh] = None,
    record_frames: Optional[int] = None,
    use_scan: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
    progress_every: Optional[int] = None,
    dtype: Any = jnp.float32,
) -> LongVideoLatents:
  """Samples K clips of long-video latents with the VidRD reference's algorithm.

  Args:
    eps_fn: the denoiser (hashable and stable across calls, see ``ClipSampler``).
    params: its parameters (replicated over the mesh).
    scheduler: the DDIM schedule.
    context: prompt embeddings [B, L, D].
    negative_context: negative-prompt embeddings [B, L, D] (or [1, L, D]); needed for CFG.
    latent_shape: (h, w, C) of one frame's latents.
    num_clips, frames_per_clip, overlap, noise_recycle, staged_guidance_strength: K, N, M, alpha, beta.
    noise_alpha: progressive first-clip noise strength (0: i.i.d.).
    num_steps: S DDIM steps.
    guidance_scale: CFG scale w (CFG runs when w > 1, as in diffusers).
    eta: DDIM eta.
    seed: PRNG seed; prompt b's draws come from fold_in(key(seed), prompt_ids[b]).
    prompt_ids: one non-negative id per prompt (default 0..B-1); give global indices when
      splitting a prompt list into batches so that each video does not depend on its batch.
    init_latents: optional z_T of the first clip [B, N, h, w, C], used as given.
    clip_noise: optional standard-normal fresh noise [B, K-1, N, h, w, C] for clips 1..K-1;
      frames j >= M are scaled by 1/sqrt(1+alpha^2) (PNS), frames j < M are unused.
    progressive_reference_exact: see :func:`progressive_noise`.
    mesh: device mesh; prompts are split over its ``data`` and ``fsdp`` axes (default: a 1-D
      ``data`` mesh over all devices).
    record_frames: return flip_frames(z_s)[:, :R] of every step and clip (R = this), for analysis.
    use_scan: False runs the steps as a Python loop (same maths; for tests).
    progress: optional host callback progress(clip, steps_done) during each clip.
    progress_every: report every this many steps (default: about 10 reports per clip).
    dtype: latent dtype.

  Returns:
    LongVideoLatents with [B, K, N, h, w, C] latents and initial noise.
  """
  context = np.asarray(context) if not isinstance(context, jax.Array) else context
  batch = context.shape[0]
  n, m, k, s_steps = frames_per_clip, overlap, num_clips, num_steps
  validate_long_video_args(k, n, m, noise_recycle, staged_guidance_strength, noise_alpha, s_steps, eta)
  clip_shape = (n,) + tuple(latent_shape)
  if init_latents is not None and tuple(np.shape(init_latents)) != (batch,) + clip_shape:
    raise ValueError(f"init_latents must have shape {(batch,) + clip_shape}, got {tuple(np.shape(init_latents))}")
  if clip_noise is not None and tuple(np.shape(clip_noise)) != (batch, k - 1) + clip_shape:
    raise ValueError(f"clip_noise must have shape {(batch, k - 1) + clip_shape}, got {tuple(np.shape(clip_noise))}")
  use_cfg = guidance_scale > 1.0
  if use_cfg and negative_context is None:
    raise ValueError("guidance_scale > 1 needs negative_context (the unconditional embeddings)")

  mesh = make_data_mesh() if mesh is None else mesh
  axes_b, ndev = batch_axes(mesh)
  padded = -(-batch // ndev) * ndev

  def pad(x, axis=0):
    # Repeat the last prompt's data; the extra rows are dropped on return.
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if padded == batch:
      return x
    idx = np.concatenate([np.arange(batch), np.full(padded - batch, batch - 1)])
    return jnp.take(x, idx, axis=axis) if isinstance(x, jax.Array) else np.take(x, idx, axis=axis)

  batch_spec = P(axes_b)
  if use_cfg:
    neg = np.asarray(negative_context) if not isinstance(negative_context, jax.Array) else negative_context
    neg = jnp.broadcast_to(neg, context.shape) if neg.shape[0] == 1 else neg
    pair = jnp.stack([jnp.asarray(neg), jnp.asarray(context)], axis=1)
  else:
    pair = jnp.asarray(context)[:, None]
  pair = _put(pad(pair).astype(dtype), mesh, batch_spec)
  # Parameters already laid out on this mesh (e.g. FSDP-sharded in training) stay as they are.
  params = jax.tree.map(lambda x: x if _on_mesh(x, mesh) else _put(x, mesh, P()), params)
  ids = np.arange(batch) if prompt_ids is None else np.asarray(prompt_ids, np.int64)
  if ids.shape != (batch,) or (ids < 0).any():
    raise ValueError(f"prompt_ids must be {batch} non-negative integers, got {prompt_ids!r}")
  # Padding rows get ids no real prompt has (they are dropped anyway).
  ids = np.concatenate([ids, ids.max() + 1 + np.arange(padded - batch)])
  keys = _put(jax.random.key_data(_prompt_keys(seed, ids)), mesh, batch_spec)
  keys = jax.random.wrap_key_data(keys)

  sampler = ClipSampler(eps_fn=eps_fn, scheduler=scheduler, num_steps=s_steps, use_cfg=use_cfg,
                        stochastic=eta > 0, record_frames=max(m, record_frames or 0),
                        progress_every=0 if progress is None else (progress_every or max(1, s_steps // 10)))
  run = denoise_clip if use_scan else denoise_clip_loop
  gs = jnp.float32(guidance_scale)
  eta_arr = jnp.float32(eta)
  dsg_mask = jnp.asarray(staged_guidance_schedule(s_steps, m, staged_guidance_strength))
  no_dsg = jnp.zeros_like(dsg_mask)

  finals, inits, trajs = [], [], []
  if progress is not None:
    set_progress_hook(progress)
  prev_init = None
  # The first clip has no past (its DSG mask is all False); zeros keep the program's signature.
  past = jnp.zeros((s_steps, padded, sampler.record_frames) + tuple(latent_shape), dtype,
                   device=NamedSharding(mesh, P(None, axes_b)))
  for clip in range(k):
    # Every clip's draws come from its own tags, so clip i's noise does not depend on K.
    if clip == 0:
      if init_latents is not None:
        z_t = _put(pad(init_latents).astype(dtype), mesh, batch_spec)
      else:
        normals = _draw_normals(keys, jnp.int32(0), clip_shape, dtype)
        z_t = _progressive_noise_jit(normals, jnp.float32(noise_alpha), reference_exact=progressive_reference_exact)
    else:
      if clip_noise is not None:
        fresh = _put(pad(np.asarray(clip_noise)[:, clip - 1]).astype(dtype), mesh, batch_spec)
      else:
        fresh = _draw_normals(keys, jnp.int32(clip), clip_shape, dtype)
      z_t = _next_clip_noise_jit(prev_init, fresh, m, jnp.float32(noise_recycle))
    step_keys = jax.vmap(lambda kk, c=clip: jax.random.fold_in(kk, 1_000_000 + c))(keys)
    # The mesh in context lets kernels XLA cannot partition (Pallas TPU attention) run per
    # prompt shard (models.attention.per_batch_shard).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      result = run(sampler, params, z_t, pair, gs, eta_arr, past, dsg_mask if clip > 0 else no_dsg,
                   step_keys, clip)
    finals.append(result.latents)
    inits.append(z_t)
    if record_frames:
      trajs.append(result.trajectory)
    prev_init, past = z_t, result.trajectory
  if progress is not None:
    jax.block_until_ready(finals[-1])
    jax.effects_barrier()
    set_progress_hook(None)

  latents = jnp.stack(finals, axis=1)[:batch]
  initial = jnp.stack(inits, axis=1)[:batch]
  trajectories = None
  if record_frames:
    # [K, S, B, R, ...] -> [B, K, S, R, ...], keeping the first R reversed frames.
    trajectories = jnp.moveaxis(jnp.stack(trajs), 2, 0)[:batch, :, :, :record_frames]
  return LongVideoLatents(latents, initial, trajectories)



# =================================================================================================
# The pipeline-level API.


@dataclasses.dataclass(frozen=True)
class UNetDenoiser:
  """``EpsFn`` for a Flax UNet module (hashable, so equal modules share compiled programs)."""
  unet: Any

  def __call__(self, params, latents, timesteps, context):
    return self.unet.apply({"params": params}, latents, timesteps, context)


class GenerateOutput(NamedTuple):
  frames: Optional[np.ndarray]   # uint8 [B, K*N, H, W, 3], or None with decode=False
  latents: np.ndarray            # [B, K, N, h, w, C] final latents of every clip
  initial_noise: np.ndarray      # [B, K, N, h, w, C] z_T of every clip


def _as_prompt_list(prompts, what: str) -> list[str]:
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts:
    raise ValueError(f"{what} is empty: give at least one prompt")
  bad = [p for p in prompts if not isinstance(p, str)]
  if bad:
    raise TypeError(f"{what} must be strings, got {type(bad[0]).__name__}")
  return prompts


def pixel_size_multiple(pipe: Any) -> int:
  """Heights and widths must be multiples of this: VAE factor x the UNet's total downsampling."""
  unet_factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
  return int(pipe.vae_downsample_factor) * unet_factor


def generate(
    pipe: Any,
    prompts: Sequence[str] | str,
    num_clips: int = 1,
    frames_per_clip: int = 8,
    overlap: int = 4,
    noise_recycle: float = 4.0,
    staged_guidance: float = 0.4,  # pylint: disable=redefined-outer-name
    noise_alpha: float = 0.0,
    num_steps: int = 50,
    guidance_scale: float = 10.0,
    negative_prompt: Sequence[str] | str | None = "watermark",
    eta: float = 0.0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    seed: int = 0,
    init_latents: Optional[np.ndarray | jax.Array] = None,
    clip_noise: Optional[np.ndarray | jax.Array] = None,
    decode: bool = True,
    reference_exact: bool = False,
    *,
    prompt_ids: Optional[Sequence[int]] = None,
    progressive_reference_exact: bool = True,
    temporal_decode: Optional[bool] = None,
    mesh: Optional[Mesh] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> GenerateOutput:
  """Text -> long video with VidRD (defaults: the reference's inference settings).

  Args:
    pipe: a ``vidrd_jax.Pipeline`` (``vidrd_jax.load_pipeline``).
    prompts: B prompts (or one string).
    num_clips: K clips; the video has K * frames_per_clip frames (overlap frames included, as
      the reference concatenates whole clips).
    frames_per_clip: N.
    overlap: M frames shared with the previous clip through FNR and DSG (0 <= M < N).
    noise_recycle: PNS's alpha >= 0 (0: fresh noise for frames j >= M).
    staged_guidance: DSG's beta in [0, 1] (0: off).
    noise_alpha: progressive frame-correlated first-clip noise (0: i.i.d.; see
      :func:`progressive_noise` for the reference's variance).
    num_steps: DDIM steps S.
    guidance_scale: classifier-free guidance w (CFG runs when w > 1).
    negative_prompt: the unconditional text (one string, or one per prompt; None: "").
    eta: DDIM eta.
    height, width: output size in pixels (multiples of :func:`pixel_size_multiple`: 64 for SD2.1);
      None: ``pipe.native_size``, the size a ``vidrd_jax.train`` export was trained at, else
      the reference's 256x256.
    seed: PRNG seed (prompt b uses fold_in(key(seed), prompt_ids[b]): same seed, same video).
    init_latents: optional first-clip z_T [B, N, h, w, C].
    clip_noise: optional standard-normal [B, K-1, N, h, w, C] fresh noise for clips 1..K-1.
    decode: decode to frames with the VAE.
    reference_exact: decode every frame alone, as the released reference does; False (default)
      decodes each clip with the temporal decoder over its N frames (the paper's intent).
    prompt_ids: per-prompt noise ids (default 0..B-1), see :func:`sample_long_video`.
    progressive_reference_exact: the reference's progressive-noise variance (True) or PYoCo's
      unit-variance form (False), see :func:`progressive_noise`.
    temporal_decode: override the temporal-decoding choice (None: as ``reference_exact`` says).
    mesh: device mesh; prompts are split over its ``data`` and ``fsdp`` axes (default: every
      device on one ``data`` axis).
    progress: host callback progress(clip, steps_done), about 10 times per clip.

  Returns:
    GenerateOutput(frames uint8 [B, K*N, H, W, 3] | None, latents [B, K, N, h, w, C],
    initial_noise [B, K, N, h, w, C]) as NumPy arrays on the host.
  """
  prompts = _as_prompt_list(prompts, "prompts")
  batch = len(prompts)
  if negative_prompt is None:
    negative_prompt = ""
  negatives = [negative_prompt] if isinstance(negative_prompt, str) else _as_prompt_list(
      negative_prompt, "negative_prompt")
  if len(negatives) not in (1, batch):
    raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch} prompts")
  native_h, native_w = pipe.native_size
  height = native_h if height is None else height
  width = native_w if width is None else width
  factor = pixel_size_multiple(pipe)
  for name, size in (("height", height), ("width", width)):
    if size <= 0 or size % factor:
      raise ValueError(f"{name}={size} must be a positive multiple of {factor} (the VAE's downsampling "
                       f"{pipe.vae_downsample_factor} x the UNet's {factor // pipe.vae_downsample_factor})")
  factor = int(pipe.vae_downsample_factor)
  validate_long_video_args(num_clips, frames_per_clip, overlap, noise_recycle, staged_guidance,
                           noise_alpha, num_steps, eta)
  channels = int(pipe.unet.config.in_channels)
  latent_shape = (height // factor, width // factor, channels)

  context = pipe.encode_prompt(prompts)
  negative_context = pipe.encode_prompt(negatives) if guidance_scale > 1.0 else None
  dtype = jnp.float32
  sampled = sample_long_video(
      UNetDenoiser(pipe.unet), pipe.params["unet"], pipe.scheduler, context, negative_context,
      latent_shape=latent_shape, num_clips=num_clips, frames_per_clip=frames_per_clip, overlap=overlap,
      noise_recycle=noise_recycle, staged_guidance_strength=staged_guidance, noise_alpha=noise_alpha,
      num_steps=num_steps, guidance_scale=guidance_scale, eta=eta, seed=seed, prompt_ids=prompt_ids,
      init_latents=init_latents,
      clip_noise=clip_noise, progressive_reference_exact=progressive_reference_exact, mesh=mesh,
      progress=progress, dtype=dtype)

  frames = None
  if decode:
    mesh = make_data_mesh() if mesh is None else mesh
    axes_b, ndev = batch_axes(mesh)
    b, k, n = batch, num_clips, frames_per_clip
    flat = sampled.latents.reshape((b, k * n) + latent_shape)
    # Decode sharded like sampling: pad the batch to the device count again (dropped below).
    padded = -(-b // ndev) * ndev
    flat = jnp.concatenate([flat, jnp.repeat(flat[-1:], padded - b, axis=0)]) if padded > b else flat
    flat = _put(flat, mesh, P(axes_b))
    vae_params = jax.tree.map(lambda x: x if _on_mesh(x, mesh) else _put(x, mesh, P()), pipe.params["vae"])
    # Each N-frame clip is decoded as its own clip (chunk_frames=N), as the reference decodes per clip.
    temporal = (not reference_exact) if temporal_decode is None else temporal_decode
    video = pipe.decode_latents(flat, temporal=temporal, chunk_frames=n,
                                reference_exact=reference_exact and temporal_decode is None, params=vae_params)
    from vidrd_jax.video_io import to_uint8  # pylint: disable=g-import-not-at-top
    frames = to_uint8(to_host(video)[:b], value_range=(-1.0, 1.0))
  return GenerateOutput(frames, to_host(sampled.latents), to_host(sampled.initial_noise))
