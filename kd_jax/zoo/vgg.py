"""VGG with batch norm for CIFAR, as RepDistiller's `vgg.py` (`vgg8_bn` ..
`vgg19_bn`): no fully connected layers but the classifier.

Five blocks of [Conv 3x3 (padding 1, with bias) -> BN -> ReLU] x n, a 2x2
max-pool after blocks 0, 1 and 2 (and after block 3 for 64x64 inputs only,
as RepDistiller decides by the image height), a global average pool and a
linear head on 512 features. Convolutions are initialised N(0, sqrt(2 / (k
* k * out_channels))) (kaiming-normal, fan_out) with zero bias, the head
N(0, 0.01) with zero bias, as in RepDistiller.

Block widths (`VGG_WIDTHS`): vgg8 has one convolution per block, vgg11 one
in blocks 0-1 and two in 2-4, vgg13 two in each, vgg16 two, two, three,
three, three, vgg19 two, two, four, four, four. Sown features for 32x32
inputs (every variant):

  stem            (B, 32, 32, 64)    block0's output (after its ReLU), f0
  stage1          (B, 16, 16, 128)   ReLU(block1(pool(stem)))
  stage2          (B, 8, 8, 256)     ReLU(block2(pool(stage1)))
  stage3          (B, 4, 4, 512)     ReLU(block3(pool(stage2)))
  stage4          (B, 4, 4, 512)     ReLU(block4(stage3)) (no pool between)
  stageK_preact   as stageK          the block's last BN, before its ReLU
  embedding       (B, 512)           the pooled stage4
"""

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax

from kd_jax.zoo import layers

VGG_WIDTHS: dict[str, tuple[tuple[int, ...], ...]] = {
    'vgg8': ((64,), (128,), (256,), (512,), (512,)),
    'vgg11': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    'vgg13': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    'vgg16': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
              (512, 512, 512)),
    'vgg19': ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _block(x: jax.Array, widths: Sequence[int], index: int,
           train: bool) -> jax.Array:
  """Block `index`: conv-BN per entry of `widths`, ReLUs between them but
  not after the last: `(B, H, W, C)` -> `(B, H, W, widths[-1])` before the
  block's last ReLU. Call inside `VGG.__call__`."""
  for j, width in enumerate(widths):
    x = layers.conv_bn(x, width, 3, padding=1, use_bias=True,
                       relu=j < len(widths) - 1, train=train,
                       name=f'block{index}_conv{j}')
  return x


class VGG(nn.Module):
  """VGG-BN of five blocks with `widths[b]` convolutions in block b.

  Attributes:
    widths: the output channels of each block's convolutions, five blocks
      (e.g. `VGG_WIDTHS['vgg13']`).
    num_classes: K, the head's outputs.
  """
  widths: Sequence[Sequence[int]]
  num_classes: int = 100
  num_stages: ClassVar[int] = 4

  @nn.nowrap
  def bn_before_relu(self, layer: str) -> tuple[str, ...] | None:
    """The `params` path of the batch norm whose output is `layer`.

    RepDistiller's `get_bn_before_relu`: for `stageK_preact`, block K's
    last BN. None for any other layer.
    """
    stage = layers.preact_stage(layer, self.num_stages)
    if stage is None:
      return None
    return (f'block{stage}_conv{len(self.widths[stage]) - 1}_bn',)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images `(B, H, W, C)` -> logits `(B, num_classes)`."""
    pool_block3 = x.shape[1] == 64
    x = nn.relu(_block(x, self.widths[0], 0, train))
    self.sow('intermediates', 'stem', x)
    for b in range(1, 5):
      if b < 4 or pool_block3:
        x = layers.max_pool_2x2(x)
      preact = _block(x, self.widths[b], b, train)
      x = nn.relu(preact)
      layers.sow_stage(self, b, x, preact)
    return layers.classify(self, x, self.num_classes,
                           kernel_init=layers.NORMAL_001,
                           bias_init=nn.initializers.zeros)


def vgg(name: str, **kwargs) -> VGG:
  """RepDistiller's `{name}_bn`, e.g. `vgg('vgg8')`; `kwargs` are further
  `VGG` attributes."""
  return VGG(widths=VGG_WIDTHS[name], **kwargs)
