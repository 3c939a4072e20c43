"""ResNets: RepDistiller's CIFAR ResNets (`resnet.py`) and ResNet-50
(`resnetv2.py`), one post-activation design (He et al. 2016).

Stem Conv 3x3 (stride 1, padding 1) -> BN -> ReLU, then stages of residual
blocks (the first block of every stage but the first has stride 2; a block
whose stride or width changes has a 1x1 conv + BN shortcut), a global
average pool and a linear head. Convolutions have no bias and are
initialised with kaiming-normal (fan_out), BN with scale 1 and bias 0, the
head with PyTorch's default, all as in RepDistiller.

CIFAR ResNets (`resnet8` .. `resnet110`: `(depth - 2) // 6` basic blocks per
stage, widths 16 -> 16, 32, 64; `resnet8x4`, `resnet32x4`: 32 -> 64, 128,
256). Sown features for 32x32 inputs (W = 16, w = (16, 32, 64); x4 models:
W = 32, w = (64, 128, 256)):

  stem            (B, 32, 32, W)    ReLU(BN(conv1(x))), RepDistiller's f0
  stage1          (B, 32, 32, w1)   layer1's output (after its last ReLU)
  stage2          (B, 16, 16, w2)   layer2's output
  stage3          (B, 8, 8, w3)     layer3's output
  stageK_preact   as stageK         the last block's residual sum before
                                    its ReLU (RepDistiller's preact)
  embedding       (B, w3)           the pooled stage3

`resnet50` (`resnetv2.ResNet50`): stem width 64, four stages of (3, 4, 6, 3)
bottleneck blocks of widths 64, 128, 256, 512 (outputs x4): stem
(B, 32, 32, 64), stage1 (B, 32, 32, 256), stage2 (B, 16, 16, 512), stage3
(B, 8, 8, 1024), stage4 (B, 4, 4, 2048), embedding (B, 2048).

A block returns its residual sum *before* the final ReLU, which the network
applies, so that the last block's pre-activation can be sown; capturing a
block (e.g. `BasicBlock_0`) with `capture_intermediates` therefore gives the
pre-activation.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

from kd_jax.zoo import layers


def _shortcut(x: jax.Array, features: int, strides: int,
              train: bool) -> jax.Array:
  """The identity, or 1x1 conv (stride `strides`) + BN where the stride or
  the width changes: `(B, H, W, C)` -> `(B, H / strides, W / strides,
  features)`. Call inside a block's compact `__call__`."""
  if strides == 1 and x.shape[-1] == features:
    return x
  return layers.conv_bn(x, features, 1, strides=strides, relu=False,
                        train=train, name='shortcut')


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, before the final ReLU.

  Maps `(B, H, W, C)` to `(B, H / strides, W / strides, features)`.
  """
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Input `(B, H, W, C)` -> pre-activation residual sum."""
    y = layers.conv_bn(x, self.features, 3, strides=self.strides, padding=1,
                       train=train, name='conv1')
    y = layers.conv_bn(y, self.features, 3, padding=1, relu=False,
                       train=train, name='conv2')
    return layers.residual_sum(
        y, _shortcut(x, self.features, self.strides, train), train=train)


class Bottleneck(nn.Module):
  """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN plus the
  shortcut, before the final ReLU.

  Maps `(B, H, W, C)` to `(B, H / strides, W / strides, 4 * features)`.
  """
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Input `(B, H, W, C)` -> pre-activation residual sum."""
    y = layers.conv_bn(x, self.features, 1, train=train, name='conv1')
    y = layers.conv_bn(y, self.features, 3, strides=self.strides, padding=1,
                       train=train, name='conv2')
    y = layers.conv_bn(y, 4 * self.features, 1, relu=False, train=train,
                       name='conv3')
    return layers.residual_sum(
        y, _shortcut(x, 4 * self.features, self.strides, train), train=train)


class ResNet(nn.Module):
  """A ResNet of `len(widths)` stages of `blocks[k]` blocks each.

  Attributes:
    stem_width: the stem convolution's output channels.
    widths: each stage's block width (bottleneck outputs are 4x wider).
    blocks: each stage's number of blocks.
    bottleneck: `Bottleneck` blocks instead of `BasicBlock`s.
    num_classes: K, the head's outputs.
  """
  stem_width: int
  widths: Sequence[int]
  blocks: Sequence[int]
  bottleneck: bool = False
  num_classes: int = 100

  @property
  def num_stages(self) -> int:
    """The number of `stageK` features."""
    return len(self.widths)

  @nn.nowrap
  def bn_before_relu(self, layer: str) -> tuple[str, ...] | None:
    """The `params` path of the batch norm before the ReLU of `layer`.

    RepDistiller's `get_bn_before_relu`: for `stageK_preact`, the last
    block's last BN (`conv2_bn` of a basic block, `conv3_bn` of a
    bottleneck), whose output the block adds to its shortcut before that
    ReLU; blocks are numbered across stages (`BasicBlock_0`, ...). None for
    any other layer.
    """
    stage = layers.preact_stage(layer, self.num_stages)
    if stage is None:
      return None
    block = 'Bottleneck' if self.bottleneck else 'BasicBlock'
    return (f'{block}_{sum(self.blocks[:stage]) - 1}',
            'conv3_bn' if self.bottleneck else 'conv2_bn')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images `(B, H, W, C)` -> logits `(B, num_classes)`."""
    x = layers.conv_bn(x, self.stem_width, 3, padding=1, train=train,
                       name='conv1')
    self.sow('intermediates', 'stem', x)
    block = Bottleneck if self.bottleneck else BasicBlock
    for stage, (width, count) in enumerate(zip(self.widths, self.blocks)):
      for i in range(count):
        strides = 2 if stage > 0 and i == 0 else 1
        preact = block(width, strides)(x, train=train)
        x = nn.relu(preact)
      layers.sow_stage(self, stage + 1, x, preact)
    return layers.classify(self, x, self.num_classes)


def cifar_resnet(depth: int, widths: Sequence[int] = (16, 16, 32, 64),
                 **kwargs) -> ResNet:
  """RepDistiller's `ResNet(depth, widths, 'basicblock')`: a stem of
  `widths[0]` channels and three stages of `(depth - 2) // 6` basic blocks
  of `widths[1:]`; `kwargs` are further `ResNet` attributes."""
  if (depth - 2) % 6:
    raise ValueError(f'a CIFAR ResNet has depth 6n + 2, got {depth}')
  blocks = (depth - 2) // 6
  return ResNet(stem_width=widths[0], widths=tuple(widths[1:]),
                blocks=(blocks,) * 3, **kwargs)


def resnet50(**kwargs) -> ResNet:
  """RepDistiller's CIFAR `ResNet50` (`resnetv2.py`): 23.7M parameters for
  100 classes; `kwargs` are further `ResNet` attributes."""
  return ResNet(stem_width=64, widths=(64, 128, 256, 512),
                blocks=(3, 4, 6, 3), bottleneck=True, **kwargs)
