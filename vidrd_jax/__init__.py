"""vidrd-jax: VidRD (Reuse and Diffuse) text-to-video in JAX/Flax.

Public API::

    pipe = vidrd_jax.load_pipeline(path)
    out = vidrd_jax.generate(pipe, ["a red ball"], num_clips=4)
"""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy so that `import vidrd_jax` stays cheap and submodules import in any order.
  if name in ("load_pipeline", "Pipeline"):
    from vidrd_jax import pipeline
    return getattr(pipeline, name)
  if name in ("generate", "GenerateOutput"):
    from vidrd_jax.diffusion import long_video
    return getattr(long_video, name)
  raise AttributeError(f"module 'vidrd_jax' has no attribute {name!r}")
