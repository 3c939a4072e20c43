"""ShuffleNets for CIFAR, as RepDistiller's `ShuffleNetv1.py` (`ShuffleV1`)
and `ShuffleNetv2.py` (`ShuffleV2`, net size 1).

Both start with Conv 1x1 (3 -> 24) -> BN -> ReLU at full resolution and
have three stages whose first block halves the resolution. RepDistiller
leaves these models at PyTorch's default initialisation, and so do we:
U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)) weights for convolutions and the
head, and the same range for the head's bias.

ShuffleNetV1 (groups 3, stage widths 240, 480, 960, blocks 4, 8, 4): a
bottleneck block is grouped conv1x1 (C -> out / 4; 1 group where C is the
stem's 24) -BN-ReLU- channel shuffle - depthwise conv3x3 (stride) -BN-ReLU-
grouped conv1x1 -BN; the first block of a stage concatenates a 3x3 average
pool (stride 2, padding 1, zeros counted) of its input, the others add the
input, and a ReLU follows. Sown features for 32x32 inputs:

  stem            (B, 32, 32, 24)    ReLU(BN(conv1(x))), f0
  stage1          (B, 16, 16, 240)   layer1's output (after its last ReLU)
  stage2          (B, 8, 8, 480)     layer2's output
  stage3          (B, 4, 4, 960)     layer3's output
  stageK_preact   as stageK          the last block's sum, before its ReLU
  embedding       (B, 960)           the pooled stage3

ShuffleNetV2 (stage widths 116, 232, 464, blocks 3, 7, 3 after a
downsampling block, then Conv 1x1 to 1024 -> BN -> ReLU): a basic block
splits the channels in halves (x1, x2), maps x2 by conv1x1-BN-ReLU-
depthwise conv3x3-BN-conv1x1-BN-ReLU, concatenates [x1, that] and shuffles
the channels in 2 groups; a downsampling block concatenates two strided
branches ([depthwise 3x3-BN-1x1-BN-ReLU] and [1x1-BN-ReLU-depthwise 3x3-BN-
1x1-BN-ReLU], out / 2 channels each) and shuffles. Sown features for 32x32
inputs:

  stem            (B, 32, 32, 24)    ReLU(BN(conv1(x))), f0
  stage1          (B, 16, 16, 116)   layer1's output (shuffled)
  stage2          (B, 8, 8, 232)     layer2's output
  stage3          (B, 4, 4, 464)     layer3's output
  stageK_preact   as stageK          RepDistiller's preact: [x1, last BN]
                                     of the stage's last block, before the
                                     ReLU and the shuffle (so its channels
                                     are in unshuffled order)
  embedding       (B, 1024)          the pooled ReLU(BN(conv2(stage3)))

Blocks return their output before the final ReLU (V1) or before the ReLU
and shuffle (V2), which the networks apply, so that the pre-activation of a
stage's last block can be sown.
"""

from collections.abc import Sequence
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.zoo import layers

_conv_bn = functools.partial(layers.conv_bn, kernel_init=layers.TORCH_DEFAULT)


class ShuffleV1Block(nn.Module):
  """ShuffleNetV1's bottleneck, before its final ReLU.

  Maps `(B, H, W, C)` to `(B, H, W, C)` (stride 1, `features` = C) or to
  `(B, H / 2, W / 2, features + C)` (stride 2, the pooled input appended).
  """
  features: int
  strides: int
  groups: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Input `(B, H, W, C)` -> the block's pre-activation output."""
    mid = self.features // 4
    first_groups = 1 if x.shape[-1] == 24 else self.groups
    y = _conv_bn(x, mid, 1, groups=first_groups, train=train, name='conv1')
    y = layers.channel_shuffle(y, first_groups)
    y = _conv_bn(y, mid, 3, strides=self.strides, padding=1, groups=mid,
                 train=train, name='conv2')
    y = _conv_bn(y, self.features, 1, groups=self.groups, relu=False,
                 train=train, name='conv3')
    if self.strides == 1:
      return layers.residual_sum(y, x, train=train)
    # nn.avg_pool's arithmetic (zeros padded in, divided by 9), written with
    # lax so that ONNX export (jax2onnx) converts it.
    pooled = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1),
                                   (1, 2, 2, 1),
                                   ((0, 0), (1, 1), (1, 1), (0, 0))) / 9.0
    return jnp.concatenate([y, pooled], axis=-1)


class ShuffleNetV1(nn.Module):
  """ShuffleNetV1 of `len(widths)` stages of `blocks[k]` blocks.

  Attributes:
    widths: each stage's output channels.
    blocks: each stage's number of blocks.
    groups: the grouped 1x1 convolutions' groups.
    num_classes: K, the head's outputs.
  """
  widths: Sequence[int] = (240, 480, 960)
  blocks: Sequence[int] = (4, 8, 4)
  groups: int = 3
  num_classes: int = 100
  num_stages: ClassVar[int] = 3

  @nn.nowrap
  def bn_before_relu(self, layer: str) -> None:
    """None for every layer: RepDistiller's `get_bn_before_relu` raises
    for ShuffleNets (not supported as OFD teachers)."""
    del layer
    return None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images `(B, H, W, C)` -> logits `(B, num_classes)`."""
    x = _conv_bn(x, 24, 1, train=train, name='conv1')
    self.sow('intermediates', 'stem', x)
    for stage, (width, count) in enumerate(zip(self.widths, self.blocks)):
      for i in range(count):
        features = width - x.shape[-1] if i == 0 else width
        preact = ShuffleV1Block(features, 2 if i == 0 else 1,
                                self.groups)(x, train=train)
        x = nn.relu(preact)
      layers.sow_stage(self, stage + 1, x, preact)
    return layers.classify(self, x, self.num_classes)


class ShuffleV2Block(nn.Module):
  """ShuffleNetV2's basic block, before the ReLU and the channel shuffle.

  Maps `(B, H, W, C)` to `(B, H, W, C)`: `[x1, BN(conv3(...x2))]`.
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Input `(B, H, W, C)` -> `[x1, pre-ReLU branch]`, unshuffled."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    y = _conv_bn(x2, half, 1, train=train, name='conv1')
    y = _conv_bn(y, half, 3, padding=1, groups=half, relu=False, train=train,
                 name='conv2')
    y = _conv_bn(y, half, 1, relu=False, train=train, name='conv3')
    return jnp.concatenate([x1, y], axis=-1)


class ShuffleV2DownBlock(nn.Module):
  """ShuffleNetV2's downsampling block, before the channel shuffle.

  Maps `(B, H, W, C)` to `(B, H / 2, W / 2, features)`.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Input `(B, H, W, C)` -> the two branches concatenated."""
    mid, channels = self.features // 2, x.shape[-1]
    left = _conv_bn(x, channels, 3, strides=2, padding=1, groups=channels,
                    relu=False, train=train, name='conv1')
    left = _conv_bn(left, mid, 1, train=train, name='conv2')
    right = _conv_bn(x, mid, 1, train=train, name='conv3')
    right = _conv_bn(right, mid, 3, strides=2, padding=1, groups=mid,
                     relu=False, train=train, name='conv4')
    right = _conv_bn(right, mid, 1, train=train, name='conv5')
    return jnp.concatenate([left, right], axis=-1)


class ShuffleNetV2(nn.Module):
  """ShuffleNetV2 of `len(widths)` stages (a downsampling block, then
  `blocks[k]` basic blocks) and a 1x1 conv to `last_width` channels.

  Attributes:
    widths: each stage's output channels.
    blocks: each stage's number of basic blocks.
    last_width: the last 1x1 convolution's output channels.
    num_classes: K, the head's outputs.
  """
  widths: Sequence[int] = (116, 232, 464)
  blocks: Sequence[int] = (3, 7, 3)
  last_width: int = 1024
  num_classes: int = 100
  num_stages: ClassVar[int] = 3

  @nn.nowrap
  def bn_before_relu(self, layer: str) -> None:
    """None for every layer: RepDistiller's `get_bn_before_relu` raises
    for ShuffleNets (not supported as OFD teachers)."""
    del layer
    return None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images `(B, H, W, C)` -> logits `(B, num_classes)`."""
    x = _conv_bn(x, 24, 1, train=train, name='conv1')
    self.sow('intermediates', 'stem', x)
    for stage, (width, count) in enumerate(zip(self.widths, self.blocks)):
      x = layers.channel_shuffle(ShuffleV2DownBlock(width)(x, train=train), 2)
      for _ in range(count):
        preact = ShuffleV2Block()(x, train=train)
        x = layers.channel_shuffle(nn.relu(preact), 2)
      layers.sow_stage(self, stage + 1, x, preact)
    x = _conv_bn(x, self.last_width, 1, train=train, name='conv2')
    return layers.classify(self, x, self.num_classes)
