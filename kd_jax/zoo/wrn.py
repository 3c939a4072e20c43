"""Wide ResNets (Zagoruyko & Komodakis 2016), as RepDistiller's `wrn.py`.

WRN-depth-k: Conv 3x3 (16 channels, no BN or ReLU), three stages of
`(depth - 4) // 6` pre-activation blocks of widths 16k, 32k, 64k (strides 1,
2, 2), BN -> ReLU, global average pool, linear head. A block is
BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut: the input itself where the
width is unchanged, else a 1x1 conv of the block's activated input.
Convolutions have no bias and are initialised N(0, sqrt(2 / (k * k *
out_channels))), i.e. kaiming-normal (fan_out); the head has PyTorch's
default weights and zero bias, as in RepDistiller.

Sown features for 32x32 inputs (wrn_16_1, wrn_40_1: k = 1; wrn_16_2,
wrn_40_2: k = 2):

  stem            (B, 32, 32, 16)    conv1(x), RepDistiller's f0 (no ReLU)
  stage1          (B, 32, 32, 16k)   block1's output: a residual sum, not
                                     activated (pre-activation blocks)
  stage2          (B, 16, 16, 32k)   block2's output
  stage3          (B, 8, 8, 64k)     block3's output
  stageK_preact   as stageK          the BN that follows stageK, before its
                                     ReLU: the first BN of the next stage's
                                     first block, or the final BN for stage3
                                     (RepDistiller's preact)
  embedding       (B, 64k)           the pooled ReLU(BN(stage3))

To sow those BN outputs, the network applies each block's first BN and
passes it to the block with the raw input.
"""

from typing import ClassVar

import flax.linen as nn
import jax

from kd_jax.zoo import layers


class WideBlock(nn.Module):
  """A pre-activation block: ReLU(normed)-conv3x3-BN-ReLU-conv3x3 + shortcut.

  Maps `(B, H, W, C)` to `(B, H / strides, W / strides, features)`.
  """
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, normed: jax.Array, *,
               train: bool) -> jax.Array:
    """The block's output from its input `x` `(B, H, W, C)` and `normed`,
    the block's first BN of `x` (applied by the network)."""
    out = nn.relu(normed)
    y = layers.conv_bn(out, self.features, 3, strides=self.strides,
                       padding=1, train=train, name='conv1')
    y = layers.conv(self.features, 3, padding=1, name='conv2')(y)
    if x.shape[-1] == self.features:
      return layers.residual_sum(x, y, train=train)
    shortcut = layers.conv(self.features, 1, strides=self.strides,
                           name='shortcut')(out)
    return layers.residual_sum(shortcut, y, train=train)


class WideResNet(nn.Module):
  """WRN-`depth`-`widen`; see the module docstring.

  Attributes:
    depth: 6n + 4 (n blocks per stage).
    widen: k, the width multiplier.
    num_classes: K, the head's outputs.
  """
  depth: int
  widen: int
  num_classes: int = 100
  num_stages: ClassVar[int] = 3

  @nn.nowrap
  def bn_before_relu(self, layer: str) -> tuple[str, ...] | None:
    """The `params` path of the batch norm whose output is `layer`.

    RepDistiller's `get_bn_before_relu`: for `stageK_preact`, the first BN
    of stage K + 1's first block (auto-named `BatchNorm_{K * n}`, n blocks
    per stage), or the final BN `bn` for stage 3. None for any other layer.
    """
    stage = layers.preact_stage(layer, self.num_stages)
    if stage is None:
      return None
    if stage == self.num_stages:
      return ('bn',)
    return (f'BatchNorm_{stage * ((self.depth - 4) // 6)}',)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images `(B, H, W, C)` -> logits `(B, num_classes)`."""
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n + 4, got {self.depth}')
    blocks = (self.depth - 4) // 6
    x = layers.conv(16, 3, padding=1, name='conv1')(x)
    self.sow('intermediates', 'stem', x)
    for stage, width in enumerate((16, 32, 64)):
      for i in range(blocks):
        normed = layers.batch_norm(train)(x)
        if stage > 0 and i == 0:
          self.sow('intermediates', f'stage{stage}_preact', normed)
        strides = 2 if stage > 0 and i == 0 else 1
        x = WideBlock(width * self.widen, strides)(x, normed, train=train)
      self.sow('intermediates', f'stage{stage + 1}', x)
    normed = layers.batch_norm(train, 'bn')(x)
    self.sow('intermediates', 'stage3_preact', normed)
    return layers.classify(self, nn.relu(normed), self.num_classes,
                           bias_init=nn.initializers.zeros)
