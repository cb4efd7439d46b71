"""`import vidrd_jax` routes XLA:CPU convolutions to Eigen, keeps YNNPACK for dots, and
leaves an XLA_FLAGS that already names the option alone."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import os, vidrd_jax, jax, jax.numpy as jnp
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo_conv = conv.lower(jnp.ones((2, 32, 32, 128)), jnp.ones((3, 3, 128, 128))).compile().as_text()
attn = jax.jit(lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k))
hlo_attn = attn.lower(jnp.ones((4, 64, 32)), jnp.ones((4, 64, 32))).compile().as_text()
print("FLAGS", os.environ.get("XLA_FLAGS", ""))
print("CONV_YNN", "ynn" in hlo_conv)
print("ATTN_YNN", "ynn" in hlo_attn)
"""


def _probe(xla_flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = dict(l.split(" ", 1) for l in out.stdout.splitlines() if " " in l)
  return lines["FLAGS"], lines["CONV_YNN"] == "True", lines["ATTN_YNN"] == "True"


@pytest.mark.parametrize("user_flags", [None, "--xla_force_host_platform_device_count=2"])
def test_import_routes_convolutions_to_eigen(user_flags):
  flags, conv_ynn, attn_ynn = _probe(user_flags)
  assert "--xla_cpu_experimental_ynn_fusion_type=dot,reduce,individual_dot" in flags
  if user_flags:
    assert flags.startswith(user_flags)  # appended, the user's flags kept
  assert not conv_ynn, "the 3x3 convolution still runs in a YNNPACK fusion"
  assert attn_ynn, "attention's batched dot lost its YNNPACK fusion"


def test_user_setting_wins():
  # XLA's own default in jaxlib 0.10.2, asked for explicitly.
  user = "--xla_cpu_experimental_ynn_fusion_type=reduce,individual_dot,individual_convolution"
  flags, conv_ynn, _ = _probe(user)
  assert flags == user
  assert conv_ynn
