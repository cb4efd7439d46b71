"""bench/profile_summary.py: HLO classification and device-time summaries of jax.profiler traces."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import profile_summary as ps  # pylint: disable=g-import-not-at-top

# An optimised-HLO excerpt in the shape XLA's GPU backend writes: cuDNN conv and flash
# attention custom calls, a cuBLAS gemm, a Triton gemm fusion, reduction / elementwise /
# data-movement fusions.
_GPU_HLO = """
HloModule jit_f, is_scheduled=true

%fused_reduce.1 (p0: f32[8,10]) -> f32[8] {
  %p0 = f32[8,10]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(%p0, %c), dimensions={1}, to_apply=%add
}

%fused_concatenate.2 (p1: bf16[2,4]) -> bf16[2,12] {
  %p1 = bf16[2,4]{1,0} parameter(0)
  %pad = bf16[2,6]{1,0} pad(%p1, %c2), padding=0_0x1_1
  %s0 = bf16[2,4]{1,0} slice(%pad), slice={[0:2], [0:4]}
  ROOT %cat = bf16[2,12]{1,0} concatenate(%s0, %s0, %s0), dimensions={1}
}

%fused_multiply.3 (p2: bf16[2,4]) -> bf16[2,4] {
  %p2 = bf16[2,4]{1,0} parameter(0)
  ROOT %m = bf16[2,4]{1,0} multiply(%p2, %p2)
}

%gemm_fusion_dot.4_computation (p3: bf16[4,4]) -> bf16[4,4] {
  %p3 = bf16[4,4]{1,0} parameter(0)
  ROOT %d = bf16[4,4]{1,0} dot(%p3, %p3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.5 (x: bf16[2,4]) -> bf16[2,4] {
  %cudnn-conv-bias-activation.7 = (bf16[8,32,32,320]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), custom_call_target="__cudnn$convBiasActivationForward"
  %custom-call.8 = (bf16[8,4096,5,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
  %cublas-gemm.9 = (bf16[64,64]{1,0}, s8[0]{0}) custom-call(%y, %z), custom_call_target="__cublas$gemm"
  %input_reduce_fusion.1 = f32[8]{0} fusion(%w), kind=kInput, calls=%fused_reduce.1
  %input_concatenate_fusion.2 = bf16[2,12]{1,0} fusion(%x), kind=kInput, calls=%fused_concatenate.2
  %loop_multiply_fusion.3 = bf16[2,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_multiply.3
  %gemm_fusion_dot.4 = bf16[4,4]{1,0} fusion(%u), kind=kCustom, calls=%gemm_fusion_dot.4_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  ROOT %t = bf16[2,4]{1,0} transpose(%x), dimensions={0,1}
}
"""


def test_parse_hlo_classifies_gpu_instructions():
  cats = ps.parse_hlo(_GPU_HLO)
  assert cats["cudnn-conv-bias-activation.7"] == "convolution (cuDNN)"
  assert cats["custom-call.8"] == "attention (cuDNN)"
  assert cats["cublas-gemm.9"] == "matmul (cuBLAS)"
  assert cats["input_reduce_fusion.1"] == "reduction fusion (norms, softmax)"
  # A kInput fusion that only pads, slices and concatenates moves data; it reduces nothing.
  assert cats["input_concatenate_fusion.2"] == "copy / transpose"
  assert cats["loop_multiply_fusion.3"] == "elementwise fusion (kLoop)"
  assert cats["gemm_fusion_dot.4"].startswith("matmul (fused kernel")
  assert cats["t"] == "copy / transpose"


def test_kernel_names_fall_back_to_their_kind():
  assert ps._kernel_category("void cudnn::engines_precompiled::nchwToNhwcKernel<bf16>") == (
      "layout conversion (cuDNN)")
  assert ps._kernel_category("sm90_xmma_fprop_implicit_gemm_bf16") == "convolution (cuDNN)"
  assert ps._kernel_category("nvjet_sm90_tst_128x128_64x6") == "matmul (cuBLAS)"
  assert ps._kernel_category("something_else") == "other"


def test_summary_of_a_cpu_trace_accounts_for_the_program(tmp_path):
  def f(x, w):
    y = jnp.tanh(x @ w)
    return (y - y.mean(axis=-1, keepdims=True)) @ w

  x = jnp.ones((256, 256)) / 256
  compiled = jax.jit(f).lower(x, x).compile()
  compiled(x, x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      compiled(x, x).block_until_ready()
  hlo = compiled.as_text()
  module = hlo.split(",", 1)[0].replace("HloModule ", "").strip()
  summary = ps.summarise(ps.latest_xplane(str(tmp_path)), ps.parse_hlo(hlo), module=module, calls=2)
  assert summary["total_ms"] > 0 and summary["window_ms"] > 0
  shares = [share for _, _, share in summary["categories"]]
  assert sum(shares) == pytest.approx(1.0)
  # Two matmuls are the program's work: whatever XLA fuses them into is named a matmul.
  assert any("matmul" in c for c, _, _ in summary["categories"]), summary["categories"]
  text = ps.markdown(summary, "test")
  assert "| category | ms / call | share |" in text


def test_missing_trace_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="xplane"):
    ps.latest_xplane(str(tmp_path))
