"""Layers and conventions shared by the model zoo's families.

PyTorch's defaults, written once: batch norm (momentum 0.1, eps 1e-5),
convolutions with explicit integer padding, and the initialisers
RepDistiller's models use. Every zoo model sows the same feature names
(`stem`, `stage1`..`stageK`, `stage1_preact`..`stageK_preact`,
`embedding`; see `kd_jax.zoo`): `sow_stage` sows a stage's pair, `classify`
the embedding.
"""

from collections.abc import Callable
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

# The name of every model's classifier (its last `Dense`, to the logits);
# `kd_jax.models.CLASSIFIER`.
CLASSIFIER = 'head'

Initializer = Callable[..., jax.Array]

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'), which
# is also the N(0, sqrt(2 / (k * k * out_channels))) of WRN, VGG and
# MobileNetV2: fan_out is out_channels times the kernel's spatial size (for
# grouped convolutions too, in both frameworks).
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default for Conv2d and Linear weights: kaiming_uniform_ with
# a = sqrt(5), i.e. U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)).
TORCH_DEFAULT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
# N(0, 0.01) weights of VGG's and MobileNetV2's classifiers.
NORMAL_001 = nn.initializers.normal(0.01)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm`, its inference mode written out as arithmetic.

  With running averages it computes flax's operations in flax's order,
  `(x - mean) * (rsqrt(var + eps) * scale) + bias` (the same values), from
  the same variables; everything else is `nn.BatchNorm`'s own code. The
  reason is export: ONNX converters then see plain arithmetic, which they
  convert faithfully, instead of a batch-norm call that jax2onnx 0.12 lays
  out wrongly in residual blocks.
  """

  def __call__(self, x: jax.Array, use_running_average: bool | None = None,
               *, mask: jax.Array | None = None) -> jax.Array:
    running = nn.merge_param('use_running_average', self.use_running_average,
                             use_running_average)
    if (not running or mask is not None or self.axis != -1
        or self.is_initializing()):
      return super().__call__(x, use_running_average, mask=mask)
    multiplier = jax.lax.rsqrt(self.get_variable('batch_stats', 'var')
                               + self.epsilon)
    if self.use_scale:
      multiplier = multiplier * self.get_variable('params', 'scale')
    y = (x - self.get_variable('batch_stats', 'mean')) * multiplier
    if self.use_bias:
      y = y + self.get_variable('params', 'bias')
    return jnp.asarray(y, self.dtype or y.dtype)


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """`nn.BatchNorm2d`'s defaults: scale 1, bias 0, momentum 0.1, eps 1e-5.

  PyTorch's momentum 0.1 is Flax's 0.9 (the weight of the old average). It
  normalises the last axis of `(B, ..., C)` activations, with batch
  statistics when `train` and running averages otherwise. One difference
  remains: Flax averages the biased batch variance into the running
  variance, PyTorch the unbiased one (a factor n / (n - 1), n = B * H * W).
  """
  return BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, name=name)


def conv(features: int, kernel: int, *, strides: int = 1, padding: int = 0,
         groups: int = 1, use_bias: bool = False,
         kernel_init: Initializer = KAIMING_FAN_OUT,
         name: str | None = None) -> nn.Conv:
  """`nn.Conv2d(in, features, kernel, strides, padding, groups=groups)`.

  A `kernel` x `kernel` convolution of `(B, H, W, C)` inputs, padded by
  `padding` zeros on every side as PyTorch does (not 'SAME'); its output is
  `(B, (H + 2 * padding - kernel) // strides + 1, ..., features)`. The
  kernel has shape `(kernel, kernel, C // groups, features)`.
  """
  return nn.Conv(features, (kernel, kernel), strides=strides,
                 padding=((padding, padding), (padding, padding)),
                 feature_group_count=groups, use_bias=use_bias,
                 kernel_init=kernel_init, name=name)


def conv_bn(x: jax.Array, features: int, kernel: int, *, train: bool,
            name: str, strides: int = 1, padding: int = 0, groups: int = 1,
            use_bias: bool = False, relu: bool = True,
            kernel_init: Initializer = KAIMING_FAN_OUT) -> jax.Array:
  """`conv(...)` named `name`, then `batch_norm` named `{name}_bn`, then a
  ReLU unless `relu=False`: `(B, H, W, C)` -> `(B, H', W', features)`.

  Call inside a module's compact method (the layers become its submodules).
  """
  x = conv(features, kernel, strides=strides, padding=padding, groups=groups,
           use_bias=use_bias, kernel_init=kernel_init, name=name)(x)
  x = batch_norm(train, f'{name}_bn')(x)
  return nn.relu(x) if relu else x


def residual_sum(x: jax.Array, y: jax.Array, *, train: bool) -> jax.Array:
  """`x + y`, `(B, H, W, C)`: a residual block's output, with a fusion
  boundary after it when training on XLA:CPU.

  XLA:CPU fuses cheap elementwise producers into each of their consumers.
  A residual stream (each block adds to the previous block's sum) is a
  chain of such producers, so without a boundary every fusion of the
  backward pass that needs the stream recomputes it from the network's
  input and every block's output, reading them at the strides of the
  weight-gradient transposes: work quadratic in the depth (resnet56's train
  step: 1,361 ms without the boundary, 838 ms with it, 2026-12-03).
  `jax.lax.optimization_barrier` does not help, because XLA:CPU removes it
  before fusing; fusion never crosses a conditional, so the sum passes
  through one. Its predicate is read from the sum and its branches differ,
  so that XLA cannot fold it away: the sum itself, or (only if the sum's
  first element is NaN, a diverged run) the sum plus 0. The rest of the
  program may round differently, as fusions change (by float32 rounding,
  tested). GPUs and TPUs (where a conditional costs a synchronisation) and
  inference (the exported program) get the plain sum.
  """
  total = x + y
  if not train or jax.default_backend() != 'cpu':
    return total
  return jax.lax.cond(jnp.isnan(total.reshape(-1)[0]),
                      lambda value: value + 0, lambda value: value, total)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` of `(B, H, W, C)` (PyTorch's
  `MaxPool2d(2, 2)`), as the elementwise maximum of the four strided views
  where H and W are even (a cheaper gradient on XLA:CPU).

  Forward values are `nn.max_pool`'s; so are gradients wherever a window
  has one maximum (on ties `jnp.maximum` splits the gradient). Not a
  reduction: JAX differentiates a max reduction by comparing each input
  with the recomputed maximum and dividing by the count of equals, which
  gave 0 / 0 = NaN when XLA computed the two apart with different rounding
  (seen with `JAX_DISABLE_MOST_OPTIMIZATIONS`).
  """
  _, h, w, _ = x.shape
  if h % 2 or w % 2:
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 1::2, 0::2]),
                     jnp.maximum(x[:, 0::2, 1::2], x[:, 1::2, 1::2]))


def torch_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias of a layer with `fan_in` inputs:
  U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)

  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet's shuffle of `(B, H, W, C)`: channel `g * (C // groups) + i`
  moves to `i * groups + g` (PyTorch's view-permute-reshape, in NHWC)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, groups, c // groups)
  return jnp.swapaxes(x, 3, 4).reshape(b, h, w, c)


def feature_names(num_stages: int, preact: bool = False) -> tuple[str, ...]:
  """RepDistiller's feature list `[f0, f1, ..., fK, pooled]` as sown names.

  Args:
    num_stages: K, the model's number of stages.
    preact: name the stages' pre-activation outputs (RepDistiller's
      `preact=True`) instead of their outputs.

  Returns:
    `('stem', 'stage1', ..., 'stageK', 'embedding')`, with `'stageK_preact'`
    for `'stageK'` when `preact`.
  """
  suffix = '_preact' if preact else ''
  return ('stem', *(f'stage{k}{suffix}' for k in range(1, num_stages + 1)),
          'embedding')


def preact_stage(layer: str, num_stages: int) -> int | None:
  """K of a sown `'stageK_preact'` name (1 <= K <= `num_stages`), else None.

  The zoo's families map these names to the batch norm before each stage's
  final ReLU (their `bn_before_relu`, RepDistiller's `get_bn_before_relu`).
  """
  match = re.fullmatch(r'stage([1-9][0-9]*)_preact', layer)
  if match is None or int(match[1]) > num_stages:
    return None
  return int(match[1])


def sow_stage(module: nn.Module, index: int, x: jax.Array,
              preact: jax.Array) -> None:
  """Sows stage `index`'s output `x` and pre-activation `preact` (both
  `(B, H, W, C)`) as `stage{index}` and `stage{index}_preact`."""
  module.sow('intermediates', f'stage{index}', x)
  module.sow('intermediates', f'stage{index}_preact', preact)


def classify(module: nn.Module, x: jax.Array, num_classes: int, *,
             kernel_init: Initializer = TORCH_DEFAULT,
             bias_init: Initializer | None = None) -> jax.Array:
  """Global average pool, sown as `embedding`, then the linear head `head`.

  RepDistiller pools with fixed windows (e.g. `AvgPool2d(8)`) that cover the
  whole map for 32x32 inputs; a global mean is the same there and works for
  any image size.

  Args:
    module: the model whose compact `__call__` is running.
    x: `(B, H, W, C)` last feature map.
    num_classes: K.
    kernel_init: the head's weight initialiser (PyTorch's default unless
      given).
    bias_init: the head's bias initialiser; default PyTorch's,
      `torch_bias_init(C)`.

  Returns:
    `(B, K)` logits.
  """
  x = jnp.mean(x, axis=(1, 2))
  module.sow('intermediates', 'embedding', x)
  if bias_init is None:
    bias_init = torch_bias_init(x.shape[-1])
  return nn.Dense(num_classes, kernel_init=kernel_init, bias_init=bias_init,
                  name=CLASSIFIER)(x)
