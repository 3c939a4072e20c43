r"""The seed protocol in the tutorial's Keras code: a peer for peers.py.

  python benchmarks/peer_keras.py DATA.npz [--threads=2]

Needs Keras 3 with TensorFlow and numpy. DATA.npz as for
`peer_torch.py`. The code follows the Keras knowledge-distillation
example this project grew from: `keras.Sequential` teacher and student
(the seed CNNs: Conv2D 64/16 3x3 stride 2 'same', LeakyReLU 0.2,
MaxPooling2D 2 stride 1 'same', Conv2D 256/32 3x3 stride 2 'same', Flatten,
Dense 10), `fit` with Adam(1e-3) and batch 64 (Keras keeps the last partial
batch: one step more per epoch than kd_jax), and a `Distiller` model whose
loss is 0.1 CE + 0.9 KL(softmax(t/10) || softmax(s/10)) with the teacher
frozen. Prints one JSON object as `peer_torch.py` does.
"""

import argparse
import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # pylint: disable=g-import-not-at-top,wrong-import-position
from keras import layers  # pylint: disable=g-import-not-at-top
from keras import ops  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top


def seed_cnn(first: int, second: int, name: str) -> keras.Model:
  return keras.Sequential([
      keras.Input(shape=(28, 28, 1)),
      layers.Conv2D(first, (3, 3), strides=(2, 2), padding='same'),
      layers.LeakyReLU(negative_slope=0.2),
      layers.MaxPooling2D(pool_size=(2, 2), strides=(1, 1), padding='same'),
      layers.Conv2D(second, (3, 3), strides=(2, 2), padding='same'),
      layers.Flatten(),
      layers.Dense(10),
  ], name=name)


class Distiller(keras.Model):
  """The example's distiller: the student's loss on labels and the
  distillation loss on tempered softmaxes, the teacher in inference mode."""

  def __init__(self, student, teacher, alpha=0.1, temperature=10.0):
    super().__init__()
    self.student, self.teacher = student, teacher
    self.alpha, self.temperature = alpha, temperature
    self.student_loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True)
    self.distillation_loss_fn = keras.losses.KLDivergence()

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                   allow_empty=False):
    teacher_pred = self.teacher(x, training=False)
    student_loss = self.student_loss_fn(y, y_pred)
    distillation_loss = self.distillation_loss_fn(
        ops.softmax(teacher_pred / self.temperature, axis=1),
        ops.softmax(y_pred / self.temperature, axis=1))
    return self.alpha * student_loss + (1 - self.alpha) * distillation_loss

  def call(self, x):
    return self.student(x)


def _accuracy(model, images, labels) -> float:
  logits = model.predict(images, batch_size=1000, verbose=0)
  return float(np.mean(logits.argmax(1) == labels))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('data')
  parser.add_argument('--threads', type=int, default=2)
  args = parser.parse_args()
  tf.config.threading.set_intra_op_parallelism_threads(args.threads)
  tf.config.threading.set_inter_op_parallelism_threads(args.threads)
  keras.utils.set_random_seed(0)
  start = time.perf_counter()
  data = np.load(args.data)
  train_x, train_y = data['train_images'], data['train_labels']
  test_x, test_y = data['test_images'], data['test_labels']
  stages = {}

  def timed(name, model, epochs, evaluated=None):
    began = time.perf_counter()
    model.fit(train_x, train_y, batch_size=64, epochs=epochs, verbose=0)
    stages[name] = {'seconds': time.perf_counter() - began,
                    'test_accuracy': _accuracy(evaluated or model, test_x,
                                               test_y)}

  def compiled(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    return model

  teacher = compiled(seed_cnn(64, 256, 'teacher'))
  timed('teacher', teacher, 5)
  teacher.trainable = False
  student = seed_cnn(16, 32, 'student')
  scratch = compiled(keras.models.clone_model(student))
  scratch.set_weights(student.get_weights())  # The same initialisation.
  distiller = Distiller(student, teacher)
  distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
  timed('distill', distiller, 3, evaluated=student)
  timed('scratch', scratch, 3)
  print(json.dumps({'peer': 'keras', 'keras': keras.__version__,
                    'tensorflow': tf.__version__, 'threads': args.threads,
                    'stages': stages,
                    'seconds': time.perf_counter() - start}))


if __name__ == '__main__':
  main()
