"""MobileNetV2 for CIFAR, as RepDistiller's `mobilenetv2.py` (`mobile_half`:
expansion 6, width 0.5).

Conv 3x3 stride 2 (padding 1) -> BN -> ReLU, seven groups of inverted
residual blocks (expansion t, width c * 0.5, n blocks, first stride s, for
(t, c, n, s) in `SETTINGS`), Conv 1x1 to 1280 -> BN -> ReLU, global average
pool, linear head. A block is conv1x1 (C -> tC) -BN-ReLU- depthwise conv3x3
(stride) -BN-ReLU- conv1x1 (-> width) -BN, plus the input where stride is 1
and the width unchanged; RepDistiller keeps the 1x1 expansion even where
t = 1. Convolutions have no bias and are initialised kaiming-normal
(fan_out), the head N(0, 0.01) with zero bias, as in RepDistiller.

Stages are RepDistiller's feature points: the outputs of groups 1, 2, 4 and
6. Blocks end without a ReLU (linear bottlenecks), so a stage's
pre-activation is its output (RepDistiller returns the same list for
`preact=True`). Sown features for 32x32 inputs of `mobile_half`:

  stem            (B, 16, 16, 16)    ReLU(BN(conv1(x))), f0
  stage1          (B, 16, 16, 12)    group 1's output
  stage2          (B, 8, 8, 16)      group 2's output
  stage3          (B, 4, 4, 48)      group 4's output
  stage4          (B, 2, 2, 160)     group 6's output
  stageK_preact   = stageK
  embedding       (B, 1280)          the pooled ReLU(BN(conv2(stage4)))
"""

from typing import ClassVar

import flax.linen as nn
import jax

from kd_jax.zoo import layers

# (expansion or None for the model's, channels at width 1, blocks, stride).
SETTINGS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
    (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))
# The groups whose outputs are stage1..stage4.
STAGE_ENDS: tuple[int, ...] = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
  """Expand (1x1), depthwise 3x3, project (1x1, linear), residual if it fits.

  Maps `(B, H, W, C)` to `(B, H / strides, W / strides, features)`.
  """
  features: int
  strides: int
  expansion: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Input `(B, H, W, C)` -> the block's output."""
    hidden = x.shape[-1] * self.expansion
    y = layers.conv_bn(x, hidden, 1, train=train, name='expand')
    y = layers.conv_bn(y, hidden, 3, strides=self.strides, padding=1,
                       groups=hidden, train=train, name='depthwise')
    y = layers.conv_bn(y, self.features, 1, relu=False, train=train,
                       name='project')
    if self.strides == 1 and x.shape[-1] == self.features:
      return layers.residual_sum(x, y, train=train)
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 with expansion `expansion` and width multiplier `width`.

  Attributes:
    expansion: T, the expansion of every group but the first.
    width: the width multiplier (0.5 for RepDistiller's `mobile_half`).
    num_classes: K, the head's outputs.
  """
  expansion: int = 6
  width: float = 0.5
  num_classes: int = 100
  num_stages: ClassVar[int] = len(STAGE_ENDS)

  @nn.nowrap
  def bn_before_relu(self, layer: str) -> tuple[str, ...] | None:
    """The `params` path of the batch norm before `layer`.

    RepDistiller's `get_bn_before_relu`: for `stageK_preact`, the
    projection BN of the last block of the stage's group (blocks numbered
    across groups, `InvertedResidual_0`, ...), to which that block adds
    its input where it has a residual. None for any other layer.
    """
    stage = layers.preact_stage(layer, self.num_stages)
    if stage is None:
      return None
    group = STAGE_ENDS[stage - 1]
    last = sum(count for _, _, count, _ in SETTINGS[:group + 1]) - 1
    return (f'InvertedResidual_{last}', 'project_bn')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images `(B, H, W, C)` -> logits `(B, num_classes)`."""
    x = layers.conv_bn(x, int(32 * self.width), 3, strides=2, padding=1,
                       train=train, name='conv1')
    self.sow('intermediates', 'stem', x)
    for group, (expansion, channels, count, strides) in enumerate(SETTINGS):
      for i in range(count):
        x = InvertedResidual(int(channels * self.width),
                             strides if i == 0 else 1,
                             expansion or self.expansion)(x, train=train)
      if group in STAGE_ENDS:
        layers.sow_stage(self, STAGE_ENDS.index(group) + 1, x, x)
    last = int(1280 * self.width) if self.width > 1 else 1280
    x = layers.conv_bn(x, last, 1, train=train, name='conv2')
    return layers.classify(self, x, self.num_classes,
                           kernel_init=layers.NORMAL_001,
                           bias_init=nn.initializers.zeros)
