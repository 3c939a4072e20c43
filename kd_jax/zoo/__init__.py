"""The CIFAR model zoo of the KD benchmarks: RepDistiller's models in Flax.

RepDistiller (Tian et al., "Contrastive Representation Distillation",
github.com/HobbitLong/RepDistiller, `models/`) fixed the teachers and
students most KD papers compare on CIFAR-100. `MODELS` rebuilds each with
the same layers and, for 100 classes on 32x32x3 images, the same number of
parameters (tests/test_zoo.py holds the counts of the PyTorch models).
Every model maps images `(B, H, W, C)` float32 to logits `(B, num_classes)`
(`num_classes` defaults to 100), takes `train` (batch statistics, updated
in the `'batch_stats'` collection, when True), uses PyTorch's batch norm
(momentum 0.1, eps 1e-5) and padding, and RepDistiller's initialisation.

Features for feature distillation are sown as `'intermediates'` with the
same names in every family (`self.sow('intermediates', name, x)`; read them
with `kd_jax.train.forward_with_features`):

  stem             RepDistiller's f0: the stem's output (after its ReLU)
  stage1..stageK   RepDistiller's f1..fK: each stage's output
  stageK_preact    the same before the stage's final ReLU (RepDistiller's
                   `preact=True`, used by OFD)
  embedding        the pooled vector `(B, D)` fed to the linear head

K is 3 (CIFAR ResNets, WRNs, ShuffleNets) or 4 (resnet50, VGGs,
MobileNetV2). Each family's model also says which batch norm comes right
before the ReLU of each `stageK_preact` (its `bn_before_relu`, RepDistiller's
`get_bn_before_relu`; none for the ShuffleNets), looked up by model name
with `kd_jax.models.bn_before_relu`. Each family's module docstring says which tensor each name
is and its shape for 32x32 inputs; `feature_names` gives RepDistiller's
feature list as names, `feature_shapes` every sown shape for an image
shape without computing anything.
"""

from collections.abc import Callable, Sequence
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.zoo import layers
from kd_jax.zoo import mobilenetv2
from kd_jax.zoo import resnet
from kd_jax.zoo import shufflenet
from kd_jax.zoo import vgg
from kd_jax.zoo import wrn

_WIDE = (32, 64, 128, 256)

MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f'resnet{depth}': functools.partial(resnet.cifar_resnet, depth)
       for depth in (8, 14, 20, 32, 44, 56, 110)},
    'resnet8x4': functools.partial(resnet.cifar_resnet, 8, _WIDE),
    'resnet32x4': functools.partial(resnet.cifar_resnet, 32, _WIDE),
    'resnet50': resnet.resnet50,
    **{f'wrn_{depth}_{widen}': functools.partial(wrn.WideResNet, depth=depth,
                                                 widen=widen)
       for depth in (16, 40) for widen in (1, 2)},
    **{name: functools.partial(vgg.vgg, name) for name in vgg.VGG_WIDTHS},
    'mobilenetv2': mobilenetv2.MobileNetV2,
    'shufflenetv1': shufflenet.ShuffleNetV1,
    'shufflenetv2': shufflenet.ShuffleNetV2,
}


def feature_names(name: str, preact: bool = False) -> tuple[str, ...]:
  """RepDistiller's feature list of zoo model `name`, as sown names.

  Args:
    name: a key of `MODELS`, e.g. `'resnet8x4'`.
    preact: the stages' pre-activation names (RepDistiller's `preact=True`).

  Returns:
    `('stem', 'stage1', ..., 'stageK', 'embedding')`, or with
    `'stageK_preact'` names when `preact`; e.g. for resnet20 with 32x32
    inputs, features of shapes (B, 32, 32, 16), (B, 32, 32, 16),
    (B, 16, 16, 32), (B, 8, 8, 64) and (B, 64).

  Raises:
    KeyError: `name` is not in `MODELS`.
  """
  return layers.feature_names(MODELS[name]().num_stages, preact)


def feature_shapes(model: nn.Module | str,
                   image_shape: Sequence[int] = (32, 32, 3),
                   batch_size: int = 1) -> dict[str, tuple[int, ...]]:
  """The shape of every feature `model` sows, traced, not compiled or run.

  Args:
    model: a Flax module (any model that sows `'intermediates'`) or the
      name of a zoo model (built with its defaults).
    image_shape: (H, W, C) of the images.
    batch_size: B.

  Returns:
    `{name: shape}` (keys sorted by Flax), e.g. for resnet8 and
    32x32x3 images `{'stem': (1, 32, 32, 16), 'stage1': (1, 32, 32, 16),
    'stage1_preact': (1, 32, 32, 16), ..., 'embedding': (1, 64)}`.
  """
  if isinstance(model, str):
    model = MODELS[model]()
  images = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
  init = functools.partial(model.init_with_output, mutable=True)
  _, variables = jax.eval_shape(init, jax.random.key(0), images)
  return {name: value[0].shape
          for name, value in variables.get('intermediates', {}).items()}
