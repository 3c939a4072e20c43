r"""The CIFAR steps of `benchmarks/cifar_steps.py`, written plainly in PyTorch.

  /work/peers-venv/bin/python benchmarks/torch_cifar.py [--repeats=20]
      [--warmup=3] [--models=resnet8x4,resnet32x4,wrn_40_2,resnet56,kd]
      [--threads=2] [--batch=64]

The PyTorch column of the JAX/PyTorch comparison (`cifar_steps.py` runs this
script as a subprocess; it needs torch and numpy, not kd_jax or JAX). The
models are RepDistiller's (`models/resnet.py`, `models/wrn.py`): resnet8x4,
resnet32x4, resnet56 and wrn_40_2 for 100 classes, whose parameter counts
are checked against kd_jax's. Each step is what one kd_jax training step
does, at batch 64 of 32x32x3 images in [0, 1]:

  * augmentation of the tensor batch inside the step: zero-pad 4 pixels,
    crop a 32x32 window at a uniform offset per image (torchvision's
    `RandomCrop(32, padding=4)`), flip each image left-right with
    probability 1/2, then normalise with CIFAR-100's mean and std (kd_jax
    normalises as the model's first operation);
  * train mode, cross-entropy, `torch.optim.SGD(lr=0.05, momentum=0.9,
    weight_decay=5e-4, nesterov=False)` (RepDistiller's recipe);
  * `kd`: resnet32x4 -> resnet8x4, the teacher in eval mode under
    `torch.no_grad()` on the same augmented batch, the student trained on
    0.1 CE + 0.9 T^2 KL(teacher || student) at T = 4 (RepDistiller's
    `DistillKL`, batch mean).

Each step is called `--warmup` times, then timed `--repeats` times; one JSON
object per step is printed on its own line: `{"step", "params",
"first_call_s", "median_ms", "min_ms", "max_ms", "times_ms", "threads",
"torch"}` (`first_call_s` is the first warm-up call).
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

BATCH = 64
NUM_CLASSES = 100
MEAN = (0.5071, 0.4867, 0.4408)  # CIFAR-100, as RepDistiller and kd_jax.
STD = (0.2675, 0.2565, 0.2761)
# kd_jax's parameter counts of the same models (tests/test_zoo.py).
PARAMS = {'resnet8x4': 1_233_540, 'resnet32x4': 7_433_860,
          'wrn_40_2': 2_255_156, 'resnet56': 861_620}
STEPS = ('resnet8x4', 'resnet32x4', 'wrn_40_2', 'resnet56', 'kd')


# --- RepDistiller's CIFAR ResNets (models/resnet.py). -------------------------


def conv3x3(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1,
                   bias=False)


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU."""

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    residual = x if self.downsample is None else self.downsample(x)
    return F.relu(out + residual)


class ResNet(nn.Module):
  """RepDistiller's `ResNet(depth, num_filters, 'basicblock')`."""

  def __init__(self, depth, num_filters, num_classes=NUM_CLASSES):
    super().__init__()
    assert (depth - 2) % 6 == 0, depth
    n = (depth - 2) // 6
    self.inplanes = num_filters[0]
    self.conv1 = nn.Conv2d(3, num_filters[0], 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(num_filters[0])
    self.layer1 = self._make_layer(num_filters[1], n)
    self.layer2 = self._make_layer(num_filters[2], n, stride=2)
    self.layer3 = self._make_layer(num_filters[3], n, stride=2)
    self.fc = nn.Linear(num_filters[3], num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def _make_layer(self, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
          nn.BatchNorm2d(planes))
    layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # AvgPool2d(8) at 32x32.
    return self.fc(x)


# --- RepDistiller's Wide ResNets (models/wrn.py). -----------------------------


class WideBlock(nn.Module):
  """Pre-activation BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut."""

  def __init__(self, in_planes, out_planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
    self.equal_in_out = in_planes == out_planes
    self.shortcut = None if self.equal_in_out else nn.Conv2d(
        in_planes, out_planes, 1, stride=stride, bias=False)

  def forward(self, x):
    out = F.relu(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(self.conv1(out))))
    return (x if self.equal_in_out else self.shortcut(out)) + y


class WideResNet(nn.Module):
  """RepDistiller's `WideResNet(depth, num_classes, widen_factor)`."""

  def __init__(self, depth, widen, num_classes=NUM_CLASSES):
    super().__init__()
    assert (depth - 4) % 6 == 0, depth
    n = (depth - 4) // 6
    channels = [16, 16 * widen, 32 * widen, 64 * widen]
    self.conv1 = nn.Conv2d(3, channels[0], 3, padding=1, bias=False)
    blocks = []
    for stage in range(3):
      for i in range(n):
        blocks.append(WideBlock(channels[stage] if i == 0 else
                                channels[stage + 1], channels[stage + 1],
                                2 if stage > 0 and i == 0 else 1))
    self.blocks = nn.Sequential(*blocks)
    self.bn1 = nn.BatchNorm2d(channels[3])
    self.fc = nn.Linear(channels[3], num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()
      elif isinstance(m, nn.Linear):
        m.bias.data.zero_()

  def forward(self, x):
    x = self.blocks(self.conv1(x))
    x = F.relu(self.bn1(x))
    return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


MODELS = {
    'resnet8x4': lambda: ResNet(8, [32, 64, 128, 256]),
    'resnet32x4': lambda: ResNet(32, [32, 64, 128, 256]),
    'resnet56': lambda: ResNet(56, [16, 16, 32, 64]),
    'wrn_40_2': lambda: WideResNet(40, 2),
}


def make_model(name):
  model = MODELS[name]()
  count = sum(p.numel() for p in model.parameters())
  if count != PARAMS[name]:
    raise AssertionError(f'{name}: {count:,} parameters, kd_jax has '
                         f'{PARAMS[name]:,}')
  return model, count


# --- the step. ----------------------------------------------------------------


def augment(images, padding=4):
  """Random crop after `padding` zeros (per image) and a random left-right
  flip (probability 1/2 per image) of `(B, C, H, W)` images in [0, 1], then
  CIFAR-100's normalisation."""
  b, c, h, w = images.shape
  padded = F.pad(images, (padding,) * 4)
  offsets = torch.randint(0, 2 * padding + 1, (b, 2))
  rows = offsets[:, :1] + torch.arange(h)  # (B, H)
  cols = offsets[:, 1:] + torch.arange(w)  # (B, W)
  batch = torch.arange(b)[:, None, None]
  # (B, H, W, C): one gathered window per image.
  crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
  crops = crops.permute(0, 3, 1, 2)
  flip = torch.rand(b) < 0.5
  out = torch.where(flip[:, None, None, None], crops.flip(3), crops)
  mean = torch.tensor(MEAN).view(1, c, 1, 1)
  std = torch.tensor(STD).view(1, c, 1, 1)
  return (out - mean) / std


def sgd(model):
  return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                         weight_decay=5e-4, nesterov=False)


def kd_loss(student_logits, teacher_logits, temperature=4.0):
  """RepDistiller's `DistillKL`: T^2 KL(softmax(t / T) || softmax(s / T)),
  summed over classes, averaged over the batch."""
  log_p = F.log_softmax(student_logits / temperature, dim=1)
  q = F.softmax(teacher_logits / temperature, dim=1)
  return (F.kl_div(log_p, q, reduction='sum') * temperature**2
          / student_logits.shape[0])


def train_step_fn(name):
  model, count = make_model(name)
  model.train()
  optimizer = sgd(model)

  def step(images, labels):
    x = augment(images)
    loss = F.cross_entropy(model(x), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss
  return step, count


def distill_step_fn():
  teacher, _ = make_model('resnet32x4')
  teacher.eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  student, count = make_model('resnet8x4')
  student.train()
  optimizer = sgd(student)

  def step(images, labels):
    x = augment(images)
    with torch.no_grad():
      teacher_logits = teacher(x)
    logits = student(x)
    loss = (0.1 * F.cross_entropy(logits, labels)
            + 0.9 * kd_loss(logits, teacher_logits))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss
  return step, count


def time_step(step, images, labels, repeats, warmup):
  """(first call s, [seconds of each timed call])."""
  times, first = [], None
  for i in range(warmup + repeats):
    start = time.perf_counter()
    step(images, labels).item()
    elapsed = time.perf_counter() - start
    if i == 0:
      first = elapsed
    if i >= warmup:
      times.append(elapsed)
  return first, times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--models', default=','.join(STEPS),
                      help=f'comma-separated subset of {",".join(STEPS)}')
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--batch', type=int, default=BATCH)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  images = torch.rand(args.batch, 3, 32, 32)
  labels = torch.randint(0, NUM_CLASSES, (args.batch,))
  for name in [n for n in args.models.split(',') if n]:
    if name not in STEPS:
      raise SystemExit(f'--models: unknown step {name!r}; known: {STEPS}')
    step, count = distill_step_fn() if name == 'kd' else train_step_fn(name)
    first, times = time_step(step, images, labels, args.repeats,
                             max(args.warmup, 1))
    print(json.dumps({
        'step': name, 'params': count, 'first_call_s': round(first, 4),
        'median_ms': 1e3 * statistics.median(times),
        'min_ms': 1e3 * min(times), 'max_ms': 1e3 * max(times),
        'times_ms': [round(1e3 * t, 3) for t in times],
        'threads': torch.get_num_threads(), 'torch': torch.__version__,
    }), flush=True)


if __name__ == '__main__':
  main()
