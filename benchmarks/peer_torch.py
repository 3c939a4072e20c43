r"""The seed protocol written plainly in PyTorch: a peer for benchmarks/peers.py.

  python benchmarks/peer_torch.py DATA.npz [--threads=2]

Needs torch and numpy only. DATA.npz holds `train_images` (N, 28, 28, 1)
float32 in [0, 1], `train_labels`, `test_images`, `test_labels`, as
`peers.py` writes them. The protocol is `experiments/seed.py`'s: the seed
teacher CNN (Conv 64 3x3/2 SAME, LeakyReLU 0.2, MaxPool 2x2/1 SAME, Conv 256
3x3/2 SAME, Dense 10) trained 5 epochs; a fresh student (16 and 32
channels) distilled 3 epochs by 0.1 CE + 0.9 KL(softmax(t/10) ||
softmax(s/10)), the teacher in eval mode under no_grad; the same student
from scratch 3 epochs; Adam(1e-3), batch 64, a shuffled epoch per stage,
the last partial batch dropped (as kd_jax); test accuracy after each stage.
What kd_jax does besides (per-epoch evaluation, checkpoints, calibration,
figures) is left out: this is the code a researcher would write by hand.
Prints one JSON object: each stage's seconds and test accuracy, and the
total.
"""

import argparse
import json
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class SeedCNN(nn.Module):
  """kd_jax's SeedCNN in NCHW: 'SAME' padding of a 3x3 / stride-2
  convolution on an even size is 0 before and 1 after, as TensorFlow and
  XLA pad."""

  def __init__(self, first: int, second: int, num_classes: int = 10):
    super().__init__()
    self.conv1 = nn.Conv2d(1, first, 3, stride=2)
    self.conv2 = nn.Conv2d(first, second, 3, stride=2)
    self.head = nn.Linear(second * 7 * 7, num_classes)

  def forward(self, x):
    x = F.leaky_relu(self.conv1(F.pad(x, (0, 1, 0, 1))), 0.2)
    x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float('-inf')), 2, 1)
    x = self.conv2(F.pad(x, (0, 1, 0, 1)))
    return self.head(x.flatten(1))


def _batches(n: int, batch: int, generator: torch.Generator):
  order = torch.randperm(n, generator=generator)
  for start in range(0, n - batch + 1, batch):
    yield order[start:start + batch]


def _accuracy(model, images, labels) -> float:
  model.eval()
  with torch.no_grad():
    predictions = torch.cat([model(images[i:i + 1000]).argmax(1)
                             for i in range(0, len(images), 1000)])
  return float((predictions == labels).float().mean())


def _train(model, images, labels, epochs, loss_fn, seed):
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  generator = torch.Generator().manual_seed(seed)
  model.train()
  for _ in range(epochs):
    for rows in _batches(len(images), 64, generator):
      optimizer.zero_grad(set_to_none=True)
      loss_fn(model, images[rows], labels[rows]).backward()
      optimizer.step()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('data')
  parser.add_argument('--threads', type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  start = time.perf_counter()
  data = np.load(args.data)
  # NHWC -> NCHW once, outside the timed stages' steps.
  train_x = torch.from_numpy(data['train_images']).permute(0, 3, 1, 2)
  train_x = train_x.contiguous()
  train_y = torch.from_numpy(data['train_labels']).long()
  test_x = torch.from_numpy(data['test_images']).permute(0, 3, 1, 2)
  test_x = test_x.contiguous()
  test_y = torch.from_numpy(data['test_labels']).long()
  stages = {}

  def hard(model, x, y):
    return F.cross_entropy(model(x), y)

  def timed(name, model, epochs, loss_fn, seed):
    began = time.perf_counter()
    _train(model, train_x, train_y, epochs, loss_fn, seed)
    stages[name] = {'seconds': time.perf_counter() - began,
                    'test_accuracy': _accuracy(model, test_x, test_y)}

  teacher = SeedCNN(64, 256)
  timed('teacher', teacher, 5, hard, 0)
  teacher.eval()

  def distil(model, x, y, temperature=10.0, alpha=0.1):
    logits = model(x)
    with torch.no_grad():
      soft = F.softmax(teacher(x) / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft,
                  reduction='batchmean')
    return alpha * F.cross_entropy(logits, y) + (1 - alpha) * kl

  torch.manual_seed(1)
  student = SeedCNN(16, 32)
  scratch = SeedCNN(16, 32)
  scratch.load_state_dict(student.state_dict())  # The same initialisation.
  timed('distill', student, 3, distil, 1)
  timed('scratch', scratch, 3, hard, 1)
  print(json.dumps({'peer': 'pytorch', 'torch': torch.__version__,
                    'threads': args.threads, 'stages': stages,
                    'seconds': time.perf_counter() - start}))


if __name__ == '__main__':
  main()
