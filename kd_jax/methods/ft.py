"""Factor transfer (Kim et al., "Paraphrasing Complex Network: Network
Compression via Factor Transfer", NeurIPS 2018), as RepDistiller runs it.

FT distils one late feature map in two stages. First a *paraphraser*, an
autoencoder on the teacher's map (`Paraphraser`: three 3x3 convolutions
from `C` to `int(C * rate)` channels, the *factor*, and three 3x3
transposed convolutions back to `C`, each followed by LeakyReLU(0.1)), is
trained to reconstruct that map (mean squared error) while the teacher
stays fixed: the method's preparation stage (`objective.Preparation`
'paraphraser', its one term `PARAPHRASER_TERM`, only the paraphraser
trains). Then the student distils: a *translator* (`Translator`: three 3x3
convolutions, each with batch norm and LeakyReLU(0.1), to the factor's
`int(C_t * rate)` channels) maps the student's map to a factor, and the
term is the L1 distance between the student's factor and the teacher's
(the trained paraphraser's encoder on the teacher's map, fixed):

  factor(F) = normalise_L2(mean over channels of F^2)   (a [H * W] vector),
  loss = mean over the batch and positions of |factor(T(s)) - factor(P(t))|,

with CE at weight 1 and FT at weight 200 (RepDistiller's `-a 0 -b 200`).
The translator trains with the student (saved in its checkpoints, never
counted as its parameters); the paraphraser's final parameters are bound
into the term (`Method.prepared_by`). RepDistiller reads the last stage's
output (its `feat[-2]`, after the ReLU) of both networks; the seed
protocol's defaults are the student's conv2 (7x7x32) and bn_cnn's block2
(7x7x32).

This follows RepDistiller (`distiller_zoo/FT.py` `FactorTransfer` with p1 =
2, p2 = 1; `models/util.py` `Paraphraser(use_bn=False)` and `Translator`;
`train_student.py` and `helper/pretrain.py` for the stages: the paraphraser
trains `init_epochs` = 30 epochs on `nn.MSELoss`), not the paper or the
authors' code (Jangho-Kim/Factor-Transfer-pytorch) where they differ:
  * The factor. The paper and the authors' code L2-normalise the whole
    factor (every channel and position, flattened) and take the L1
    distance (the authors' code: `L1Loss`, β = 500, paraphrase rate k =
    0.5); RepDistiller first reduces the factor to the channel mean of its
    squares, an attention map (as AT's), and takes β = 200 for that. Here:
    RepDistiller's.
  * The paraphraser's loss: the authors' code trains it with `L1Loss`, the
    paper with a reconstruction loss in L2; RepDistiller (and here) MSE.
  * The translator: the authors' has no batch norm (commented out);
    RepDistiller's has one after each convolution, in training mode
    whenever it runs (it runs only in the training loss). Here
    `common.BatchStatsNorm`: the batch's own statistics, no running
    averages, which are never used (the translator's output reaches only
    the loss, never the evaluated student).
  * `int(C * rate)` channels, as RepDistiller (the authors round).
  * The paraphraser's stage trains with `config.student.optimizer` at its
    base learning rate, held constant (`objective.Preparation`); RepDistiller
    uses SGD at its learning rate (0.01 for its CIFAR ResNets and WRNs with
    FT). Its epochs are `paraphraser_epochs` (RepDistiller's 30 of the
    student's 240; the seed experiment takes the same 1/8 of its epochs).
  * The teacher runs in inference mode (running BN statistics), as in
    RepDistiller and the authors' code, for both stages.
  * Maps of different sizes: the larger is average-pooled to the smaller's
    size before the factors (RepDistiller pools to `(t_H, t_H)` or `(s_H,
    s_H)`, the same for square maps); sizes that are not whole multiples
    are an error naming the layers before any training.
  * Initialisation: PyTorch's defaults (U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    kernels and biases, fan_in of a transposed convolution as PyTorch
    counts it; batch norm scale 1, bias 0).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from kd_jax import fields
from kd_jax import losses
from kd_jax import objective
from kd_jax.methods import ce
from kd_jax.methods import common
from kd_jax.zoo import layers as zoo_layers

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# F.normalize's default eps: a factor of norm below it is divided by it.
NORMALIZE_EPS = 1e-12
# The slope of every LeakyReLU of the paraphraser and the translator.
NEGATIVE_SLOPE = 0.1


# --- The losses. --------------------------------------------------------------


def factor(maps: ArrayLike) -> Array:
  """RepDistiller's `FactorTransfer.factor` (p1 = 2) of feature maps.

  Args:
    maps: `[B, H, W, C]` feature maps (channels last).

  Returns:
    `[B, H * W]` (positions in row-major order, as PyTorch's `view` of
    `[B, H, W]`): per example, the channel mean of `maps**2`, divided by
    `max(its L2 norm, 1e-12)` (`F.normalize`). Computed after dividing each
    example's map by its largest |element| (which leaves the result exactly
    as it is), so that the squares neither overflow nor underflow; an
    all-zero map gives 0, with finite (zero) gradients.

  Raises:
    ValueError: `maps` not `[B, H, W, C]`.
  """
  maps = losses.as_float(maps)
  if maps.ndim != 4:
    raise ValueError(f'expected [B, H, W, C] maps, got shape {maps.shape}.')
  # `q / max(|q|, eps)` with `q = mean_c(x^2)` equals `q' / max(|q'|, eps /
  # s^2)` with `q' = mean_c((x / s)^2)`, for any s > 0: s needs no gradient.
  scale = jax.lax.stop_gradient(
      jnp.max(jnp.abs(maps), axis=(1, 2, 3), keepdims=True))
  scale = jnp.where(scale > 0, scale, 1.0)
  scaled = jnp.mean(jnp.square(maps / scale), axis=-1)
  scaled = scaled.reshape(scaled.shape[0], -1)
  norm = common.norm_and_unit(scaled)[0][:, None]
  # eps / s^2 overflows to inf for maps below ~5e-26: the factor is then 0,
  # where F.normalize's q / eps is below ~3e-39 (0, or subnormal, in
  # float32).
  floor = (NORMALIZE_EPS / scale[:, :, 0, 0]) / scale[:, :, 0, 0]
  return scaled / jnp.maximum(norm, floor)


def factor_transfer_loss_per_example(student_factor_maps: ArrayLike,
                                     teacher_factor_maps: ArrayLike) -> Array:
  """Per-example FT loss (RepDistiller's `FactorTransfer`, p1 = 2, p2 = 1).

  Args:
    student_factor_maps: `[B, h, w, c]`, the translator's output.
    teacher_factor_maps: `[B, H, W, C]`, the paraphraser's factor of the
      teacher's map, under `stop_gradient`. Where the spatial sizes differ,
      the larger map is average-pooled to the smaller's; the channel counts
      may differ (the factor averages over them).

  Returns:
    `[B]`: the mean over positions of `|factor(s) - factor(t)|`.

  Raises:
    ValueError: maps not `[B, H, W, C]`, different batch sizes, or spatial
      sizes that are not whole multiples of each other.
  """
  if jnp.ndim(student_factor_maps) != 4 or jnp.ndim(teacher_factor_maps) != 4:
    raise ValueError(f'expected [B, H, W, C] maps, got student '
                     f'{jnp.shape(student_factor_maps)} and teacher '
                     f'{jnp.shape(teacher_factor_maps)}.')
  if jnp.shape(student_factor_maps)[0] != jnp.shape(teacher_factor_maps)[0]:
    raise ValueError(f'student {jnp.shape(student_factor_maps)} and teacher '
                     f'{jnp.shape(teacher_factor_maps)} maps must have the '
                     'same batch size.')
  size = common.smaller_size(jnp.shape(student_factor_maps)[1:3],
                             jnp.shape(teacher_factor_maps)[1:3])
  student = common.average_pool_to(losses.as_float(student_factor_maps),
                                    size)
  teacher = common.average_pool_to(
      jax.lax.stop_gradient(losses.as_float(teacher_factor_maps)), size)
  return jnp.mean(jnp.abs(factor(student) - factor(teacher)), axis=-1)


def factor_transfer_loss(student_factor_maps: ArrayLike,
                         teacher_factor_maps: ArrayLike, *,
                         weights: ArrayLike | None = None) -> Array:
  """FT loss: the weighted batch mean of `factor_transfer_loss_per_example`.

  Args:
    student_factor_maps: `[B, h, w, c]`, the translator's output.
    teacher_factor_maps: `[B, H, W, C]`, the teacher's factor, under
      `stop_gradient`.
    weights: `None` or `[B]` per-example weights (e.g. a padding mask); rows
      of weight 0 reach neither the value nor any gradient.

  Returns:
    A scalar: with equal weights, RepDistiller's `(factor(s) -
    factor(t)).abs().mean()` over the batch and positions.
  """
  return losses.weighted_mean(factor_transfer_loss_per_example(
      losses.mask_rows(student_factor_maps, weights),
      losses.mask_rows(teacher_factor_maps, weights)), weights)


def reconstruction_loss(reconstruction: ArrayLike, target: ArrayLike, *,
                        weights: ArrayLike | None = None) -> Array:
  """The paraphraser's loss: mean squared error (RepDistiller's
  `nn.MSELoss()(reconstruction, target)`).

  Args:
    reconstruction: `[B, ...]`, the paraphraser's output.
    target: `[B, ...]`, same shape: the teacher's map, under
      `stop_gradient`.
    weights: `None` or `[B]` per-example weights; rows of weight 0 reach
      neither the value nor any gradient.

  Returns:
    A scalar: the weighted batch mean of each example's mean over its
    elements of the squared error (with equal weights, the mean over all
    elements).

  Raises:
    ValueError: different shapes, or no batch axis.
  """
  common.check_same_shape('reconstruction', reconstruction, 'target', target)
  if jnp.ndim(reconstruction) < 1:
    raise ValueError('reconstruction must have a batch axis, got a scalar.')
  reconstruction = losses.mask_rows(losses.as_float(reconstruction), weights)
  target = jax.lax.stop_gradient(
      losses.mask_rows(losses.as_float(target), weights))
  squares = jnp.square(reconstruction - target)
  return losses.weighted_mean(
      jnp.mean(squares.reshape(squares.shape[0], -1), axis=-1), weights)


# --- The modules. -------------------------------------------------------------


def factor_channels(channels: int, rate: float) -> int:
  """The factor's channel count, RepDistiller's `int(channels * rate)`."""
  return int(channels * rate)


def _conv3x3(features: int, fan_in: int, name: str) -> nn.Conv:
  """PyTorch's `nn.Conv2d(fan_in, features, 3, 1, 1)`, its default init."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)),
                 kernel_init=zoo_layers.TORCH_DEFAULT,
                 bias_init=zoo_layers.torch_bias_init(9 * fan_in), name=name)


def _transposed3x3(features: int, name: str) -> nn.ConvTranspose:
  """PyTorch's `nn.ConvTranspose2d(in, features, 3, 1, 1)`, its default init.

  With `transpose_kernel` the kernel is `(3, 3, features, in)`, PyTorch's
  weight `(in, features, 3, 3)` transposed, and PyTorch's padding 1 is `k -
  1 - 1 = 1` on each side of the input; PyTorch's fan_in is `features * 9`.
  """
  return nn.ConvTranspose(features, (3, 3), padding=((1, 1), (1, 1)),
                          transpose_kernel=True,
                          kernel_init=zoo_layers.TORCH_DEFAULT,
                          bias_init=zoo_layers.torch_bias_init(9 * features),
                          name=name)


class Paraphraser(nn.Module):
  """RepDistiller's `Paraphraser(t_shape, k=rate, use_bn=False)`.

  Encoder: conv3x3 `C -> C`, conv3x3 `C -> c`, conv3x3 `c -> c` (`c =
  int(C * rate)`), each with a bias and followed by LeakyReLU(0.1)
  (`encoder0..2`); decoder: transposed conv3x3 `c -> c`, `c -> C`, `C -> C`
  (stride 1, padding 1: the size is kept), each followed by LeakyReLU(0.1)
  (`decoder0..2`). No batch norm. Its input, the teacher's map, is a
  constant (under `stop_gradient`).

  `__call__` is the term's interface (`module_reads_teacher`): `([],
  [teacher map]) -> (factor, reconstruction)`; `encode` gives the factor
  alone (RepDistiller's `is_factor=True`), `paraphrase` both, of one map.
  """
  channels: int
  rate: float = 0.5

  def setup(self):
    width = factor_channels(self.channels, self.rate)
    if width < 1:
      raise ValueError(f'the paraphraser of a {self.channels}-channel map at '
                       f'rate {self.rate} has int({self.channels} * '
                       f'{self.rate}) = 0 factor channels; raise the rate')
    encoder_widths = ((self.channels, self.channels),
                      (self.channels, width), (width, width))
    self.encoder = [_conv3x3(out, fan_in, f'encoder{i}')
                    for i, (fan_in, out) in enumerate(encoder_widths)]
    self.decoder = [_transposed3x3(out, f'decoder{i}')
                    for i, out in enumerate((width, self.channels,
                                             self.channels))]

  def encode(self, x: ArrayLike) -> Array:
    """`[B, H, W, C]` teacher map -> `[B, H, W, int(C * rate)]` factor."""
    x = jax.lax.stop_gradient(losses.as_float(x))
    for layer in self.encoder:
      x = nn.leaky_relu(layer(x), NEGATIVE_SLOPE)
    return x

  def paraphrase(self, x: ArrayLike) -> tuple[Array, Array]:
    """`[B, H, W, C]` -> `(factor [B, H, W, c], reconstruction [B, H, W,
    C])`."""
    code = self.encode(x)
    y = code
    for layer in self.decoder:
      y = nn.leaky_relu(layer(y), NEGATIVE_SLOPE)
    return code, y

  def __call__(self, student: Sequence[ArrayLike],
               teacher: Sequence[ArrayLike]) -> tuple[Array, Array]:
    """`([], [t (B, H, W, C)])` -> `paraphrase(t)`."""
    if len(student) or len(teacher) != 1:
      raise ValueError(f'the paraphraser reads one teacher map and no student '
                       f'map, got {len(teacher)} and {len(student)}')
    return self.paraphrase(teacher[0])


class Translator(nn.Module):
  """RepDistiller's `Translator(s_shape, t_shape, k=rate)` (`use_bn=True`).

  conv3x3 `Cs -> Cs`, conv3x3 `Cs -> channels_out`, conv3x3 `channels_out
  -> channels_out` (`conv0..2`, with biases), each followed by
  `common.BatchStatsNorm` (`bn0..2`) and LeakyReLU(0.1). The batch norm
  always uses the batch's own statistics: the translator runs only in the
  training loss, where RepDistiller's is in training mode too, and its
  output never reaches the evaluated student, so running averages would
  never be used (see `common.BatchStatsNorm`).
  """
  channels_out: int

  @nn.compact
  def __call__(self, features: Sequence[ArrayLike]) -> Array:
    """`[s (B, H, W, Cs)]` -> `(B, H, W, channels_out)`, the student's
    factor maps."""
    x, = features
    x = losses.as_float(x)
    for i, width in enumerate((x.shape[-1], self.channels_out,
                               self.channels_out)):
      x = _conv3x3(width, x.shape[-1], f'conv{i}')(x)
      x = common.BatchStatsNorm(name=f'bn{i}')(x)
      x = nn.leaky_relu(x, NEGATIVE_SLOPE)
    return x


def _map_shape(role: str, layer: str, shape: Sequence[int]) -> None:
  if len(shape) != 3:
    raise ValueError(f'{role} layer {layer!r} {tuple(shape)}: FT needs an '
                     '(H, W, C) feature map')


def paraphraser(section: ml_collections.ConfigDict,
                student_shapes: Sequence[tuple[int, ...]],
                teacher_shapes: Sequence[tuple[int, ...]]) -> Paraphraser:
  """`PARAPHRASER_TERM`'s `module`: a `Paraphraser` of the section's teacher
  layer (its shape, batch axis dropped) at `section.rate`.

  Raises:
    ValueError: not one `(H, W, C)` teacher map, or a rate that leaves no
      factor channel (the message names the layer).
  """
  del student_shapes
  layer, = common.teacher_layers(section)
  shape, = teacher_shapes
  _map_shape('teacher', layer, shape)
  if factor_channels(shape[-1], section.rate) < 1:
    raise ValueError(f'teacher layer {layer!r} {tuple(shape)}: rate '
                     f'{section.rate} leaves int({shape[-1]} * {section.rate})'
                     ' = 0 factor channels; raise the rate')
  return Paraphraser(shape[-1], section.rate)


def translator(section: ml_collections.ConfigDict,
               student_shapes: Sequence[tuple[int, ...]],
               teacher_shapes: Sequence[tuple[int, ...]]) -> Translator:
  """The record's `module`: a `Translator` of the section's student layer to
  `int(C_t * rate)` channels.

  Raises:
    ValueError: layers that are not `(H, W, C)` maps, spatial sizes that
      are not whole multiples of each other (the message names both
      layers), or a rate that leaves no factor channel.
  """
  s_layer, = common.student_layers(section)
  _map_shape('student', s_layer, student_shapes[0])
  paraphraser(section, (), teacher_shapes)  # The teacher's checks.
  common.paired_map_sizes(section, student_shapes, teacher_shapes)
  return Translator(factor_channels(teacher_shapes[0][-1], section.rate))


# --- The terms and the records. -----------------------------------------------


def _paraphraser_term(section: ml_collections.ConfigDict) -> objective.TermFn:
  """The preparation stage's term: the paraphraser's reconstruction error
  of the teacher's map."""
  layer, = common.teacher_layers(section)

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    _, reconstruction = student.modules[PARAPHRASER_NAME]
    return reconstruction_loss(reconstruction, teacher.features[layer],
                               weights=objective.batch_weights(batch)), {}
  return term


def _term(section: ml_collections.ConfigDict,
          paraphraser_params: Any) -> objective.TermFn:
  """The distil term; `paraphraser_params`: the `params` collection of the
  trained `Paraphraser` (the preparation stage's module)."""
  layer, = common.teacher_layers(section)
  rate = section.rate
  params = jax.tree.map(jnp.asarray, paraphraser_params)

  def term(student: objective.Outputs, teacher: objective.Outputs, batch):
    maps = teacher.features[layer]
    teacher_factor = Paraphraser(maps.shape[-1], rate).apply(
        {'params': params}, maps, method=Paraphraser.encode)
    return factor_transfer_loss(
        student.modules['ft'], jax.lax.stop_gradient(teacher_factor),
        weights=objective.batch_weights(batch)), {}
  return term


def _one_layer_each(section: ml_collections.ConfigDict,
                    flat: Mapping[str, Any]) -> list[str]:
  del flat
  problems = []
  for role in ('student', 'teacher'):
    names = fields.parse_list(section[f'{role}_layers'])
    if len(names) != 1:
      problems.append(
          f'config.distill.ft.{role}_layers = {section[f"{role}_layers"]!r}: '
          'FT reads exactly one layer of each network (the last stage\'s '
          'feature map)')
  return problems


def _zoo_last_stage(teacher: tuple[str, ...], student: tuple[str, ...]
                    ) -> dict[str, str]:
  """Each network's last stage (RepDistiller's `feat[-2]`; `feature_names`
  are stem, stage1..K, embedding)."""
  return {'student_layers': student[-2], 'teacher_layers': teacher[-2]}


PARAPHRASER_NAME = 'ft_paraphraser'

SETTINGS = {
    # RepDistiller's `-a 0 -b 200` (scripts/run_cifar_distill.sh), CE at 1.
    'weight': objective.term_weight(200.0),
    # The seed student's last map and bn_cnn's matching 7x7 map.
    **common.layer_settings('conv2', 'block2'),
    'rate': objective.Setting(
        0.5, fields.Field(float, lambda v: 0 < v <= 1, 'a number in (0, 1]'),
        'Paraphrase rate k: the factor has int(C_t * k) channels, C_t the '
        'teacher layer\'s. Number in (0, 1].'),
    'paraphraser_epochs': objective.Setting(
        30, fields.int_at_least(1),
        'Epochs of the paraphraser\'s stage (RepDistiller\'s init_epochs, 30 '
        'of its 240). Integer >= 1.'),
}

# The preparation stage's one term. It reads the `ft` section (its teacher
# layer and rate; the pipeline sets its weight to 1): `settings` are the
# method's, for `objective.default_section`; it has no section of its own.
PARAPHRASER_TERM = objective.Method(
    name=PARAPHRASER_NAME,
    reference='Kim et al., NeurIPS 2018',
    description="the paraphraser's reconstruction (mean squared error) of "
                "the teacher's feature map",
    settings=SETTINGS,
    loss=_paraphraser_term,
    teacher_layers=common.teacher_layers,
    module=paraphraser,
    module_reads_teacher=True,
)

METHOD = objective.Method(
    name='ft',
    reference='Kim et al., NeurIPS 2018',
    description="a late feature map's factor (a trained paraphraser's code "
                "of the teacher's; a translator's of the student's), by L1 "
                'distance of normalised attention maps',
    settings=SETTINGS,
    loss=_term,
    terms=(ce.TERM.name, 'ft'),
    student_layers=common.student_layers,
    teacher_layers=common.teacher_layers,
    module=translator,
    prepared_by=PARAPHRASER_NAME,
    preparation=objective.Preparation(
        name='paraphraser',
        title='FT paraphraser (student untrained)',
        term=PARAPHRASER_TERM,
        trains='modules',
        epochs=lambda config: config.distill.ft.paraphraser_epochs),
    check=_one_layer_each,
    zoo_settings=_zoo_last_stage,
)
