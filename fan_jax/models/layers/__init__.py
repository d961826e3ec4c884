"""Convolution layers written as matmuls and shifted slices.

XLA:CPU lowers 1x1 convolutions, grouped (depthwise) convolutions and transposed
convolutions poorly, especially their gradients (a 1x1 conv's backward pass is ~20x
slower than the same matmul's). Each layer here keeps the parameter names and shapes
of the flax layer it replaces, so checkpoints and weight converters see `nn.Conv` /
`nn.ConvTranspose` layouts, and is tested against the plain `lax` convolution.

Each layer also has its native `lax` form (`conv_impl`): 'matmul' (the forms here) or 'lax'
(`lax.conv_general_dilated` / `lax.conv_transpose`), chosen per backend at trace time
(`CONV_IMPL_DEFAULTS`: 'matmul' on the CPU, 'lax' on GPU and TPU, where XLA's native
convolutions map to cuDNN and the MXU; $FAN_JAX_CONV_IMPL overrides it).
`benchmarks/run.py --sections accelerator` times both on the device it runs on.

  forms       `conv_impl`, `use_conv_impl`, `CONV_IMPL_DEFAULTS`; types; 'SAME' padding;
              the inference forms: `use_dot_dtype` (bf16 matmuls), `use_unrolled_dots`
              (few-channel matmuls as fused multiply-adds), `inference_forms` (both)
  pointwise   `PointwiseConv` (1x1 as a matmul), `PatchConv` / `patch_conv` (the stem)
  depthwise   `DepthwiseConv` / `depthwise_conv` (shifted slices, custom VJP)
  transposed  `ConvTranspose` / `conv_transpose_torch` (PyTorch semantics)
  batchnorm   `BatchNorm` / `batch_norm_act_train` (fused activation, custom VJP)
"""

from fan_jax.models.layers.batchnorm import BatchNorm, batch_norm_act_train
from fan_jax.models.layers.depthwise import DepthwiseConv, depthwise_conv
from fan_jax.models.layers.forms import (
    CONV_IMPL_DEFAULTS,
    CONV_IMPLS,
    INFERENCE_UNROLL_MAX_K,
    Array,
    Initializer,
    Padding,
    _resolve_padding,
    conv_impl,
    default_kernel_init,
    dot_dtype,
    inference_forms,
    same_padding,
    unrolled_dot,
    unrolled_max_k,
    use_conv_impl,
    use_dot_dtype,
    use_unrolled_dots,
)
from fan_jax.models.layers.pointwise import PatchConv, PointwiseConv, patch_conv
from fan_jax.models.layers.transposed import (
    ConvTranspose,
    conv_transpose_torch,
    conv_transpose_torch_reference,
)

__all__ = [
    "CONV_IMPLS",
    "CONV_IMPL_DEFAULTS",
    "INFERENCE_UNROLL_MAX_K",
    "Array",
    "BatchNorm",
    "ConvTranspose",
    "DepthwiseConv",
    "Initializer",
    "Padding",
    "PatchConv",
    "PointwiseConv",
    "_resolve_padding",
    "batch_norm_act_train",
    "conv_impl",
    "conv_transpose_torch",
    "conv_transpose_torch_reference",
    "default_kernel_init",
    "depthwise_conv",
    "dot_dtype",
    "inference_forms",
    "patch_conv",
    "same_padding",
    "unrolled_dot",
    "unrolled_max_k",
    "use_conv_impl",
    "use_dot_dtype",
    "use_unrolled_dots",
]
