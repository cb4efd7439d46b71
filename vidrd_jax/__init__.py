"""vidrd-jax: VidRD (Reuse and Diffuse) text-to-video in JAX/Flax.

Public API::

    pipe = vidrd_jax.load_pipeline(path)
    out = vidrd_jax.generate(pipe, ["a red ball"], num_clips=4)
"""

import os as _os

__version__ = "0.1.0"

# XLA:CPU hands convolutions, dots and reductions to YNNPACK by default. At the UNet's shapes
# Eigen's 3x3 convolutions are 10-35% faster on x86, and YNNPACK's fusions of a dot with its
# elementwise neighbours (off by default) help too: the reduced UNet3D forward runs ~10% faster,
# level with PyTorch on 2 cores (BENCHMARKS.md, "XLA:CPU kernel choice"). So: XLA's default
# minus convolutions, plus dot fusions. Appended to XLA_FLAGS at import, before any backend
# starts; an XLA_FLAGS that already names the option wins; GPU and TPU never read it.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_YNN_CHOICE = "dot,reduce,individual_dot"


def _prefer_eigen_cpu_kernels() -> None:
  flags = _os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG in flags:
    return
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    jaxlib_version = tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return
  if jaxlib_version < (0, 10):
    return  # an XLA that does not know the option refuses to start
  _os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}={_YNN_CHOICE}".strip()


_prefer_eigen_cpu_kernels()


def __getattr__(name):
  # Lazy so that `import vidrd_jax` stays cheap and submodules import in any order.
  if name in ("load_pipeline", "Pipeline"):
    from vidrd_jax import pipeline
    return getattr(pipeline, name)
  if name in ("generate", "GenerateOutput"):
    from vidrd_jax.diffusion import long_video
    return getattr(long_video, name)
  raise AttributeError(f"module 'vidrd_jax' has no attribute {name!r}")
