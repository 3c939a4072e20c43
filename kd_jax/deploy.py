"""A finished stage as a standalone inference program: ONNX and `jax.export`.

A deployed model takes what training fed it, float32 images `(B, H, W, C)`
in [0, 1] (NHWC), and returns logits `(B, K)`; the dataset's per-channel
normalisation is its first operation (as in training), so nothing outside
the file has to know it. The batch dimension is dynamic in both formats.

  loaded = load_stage('runs/seed', 'distill')
  program = inference_program(loaded)           # images -> logits, in JAX
  blob = to_jax_export(program, loaded.image_shape)
  logits = jax.export.deserialize(blob).call(images)

`to_onnx` needs the optional packages jax2onnx and onnxruntime
(`pip install 'kd_jax[export]'`).
"""

from collections.abc import Callable, Sequence
import contextlib
import dataclasses
import importlib.util
import io
import logging as pylogging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import checkpoints as checkpoints_lib
from kd_jax import data as data_lib
from kd_jax import errors
from kd_jax import models
from kd_jax import stages as stages_lib
from kd_jax import workdir as workdir_lib

FORMATS = ('onnx', 'jax')
# What each format writes in <workdir>/export/ (`<stage><suffix>`).
SUFFIXES = {'onnx': '.onnx', 'jax': '.jax_export'}
# The packages ONNX export and its check need (the `export` extra).
ONNX_PACKAGES = ('jax2onnx', 'onnxruntime')

InferenceProgram = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedStage:
  """A finished stage's network, ready for inference.

  Attributes:
    name: the stage's name in its workdir (teacher, distill, scratch, ...).
    model_name: its `kd_jax.models` name.
    model: the network, the dataset's normalisation included.
    variables: its final `params` (and `batch_stats`).
    info: its row of results.json (`test_accuracy`, `distilled_from`, ...).
    image_shape: `(H, W, C)` of one input image.
  """
  name: str
  model_name: str
  model: nn.Module
  variables: dict[str, Any]
  info: dict[str, Any]
  image_shape: tuple[int, int, int]


def parse_formats(text: str) -> tuple[str, ...]:
  """The formats of `--format` (comma-separated), checked.

  Raises:
    errors.UserInputError: an unknown format, none at all, or 'onnx' while
      jax2onnx or onnxruntime is not installed.
  """
  formats = tuple(dict.fromkeys(f.strip() for f in text.split(',')
                                if f.strip()))
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise errors.UserInputError(
        f'--format={text}: expected a comma-separated list of '
        f'{", ".join(FORMATS)}' + (f' (unknown: {", ".join(unknown)})'
                                   if unknown else ''))
  missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
  if 'onnx' in formats and missing:
    raise errors.UserInputError(
        f'--format={text}: ONNX export needs {" and ".join(missing)}; '
        "install them with pip install 'kd_jax[export]', or pass "
        '--format=jax')
  return formats


def read_workdir(workdir: str) -> tuple[ml_collections.ConfigDict,
                                        dict[str, Any]]:
  """The config and results of the kd_jax run in `workdir`.

  Raises:
    errors.UserInputError: `workdir` holds no kd_jax run (no config.json or
      results.json), or they cannot be read.
  """
  for name in ('config.json', 'results.json'):
    if not os.path.isfile(os.path.join(workdir, name)):
      raise errors.UserInputError(
          f'--workdir={workdir}: not a kd_jax workdir (no {name}); pass the '
          '--workdir of a finished run.py run')
  config = ml_collections.ConfigDict(workdir_lib.upgraded_config(
      workdir_lib.read_json(os.path.join(workdir, 'config.json'))))
  results = workdir_lib.Workdir(workdir, writes=False).load_results()
  return config, results


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
  """Every stage `config` can have, in order."""
  return list(stages_lib.stage_titles(config))


def load_stage(workdir: str, stage: str, config: ml_collections.ConfigDict,
               results: dict[str, Any]) -> LoadedStage:
  """The final network of the finished `stage` of the run in `workdir`.

  A teacher loaded from `config.teacher.checkpoint` comes from there.

  Raises:
    errors.UserInputError: the config has no such stage, the stage has not
      finished, or its checkpoint is missing, unreadable or of another
      network.
  """
  names = stage_names(config)
  if stage not in names:
    raise errors.UserInputError(
        f'--stage={stage}: {workdir} has no such stage (its stages: '
        f'{", ".join(names)})')
  info = results['stages'].get(stage)
  if not isinstance(info, dict) or 'model' not in info:
    finished = [n for n in names if n in results['stages']]
    raise errors.UserInputError(
        f'--stage={stage}: not finished in {workdir} (finished: '
        f'{", ".join(finished) or "none"}); run the same run.py command to '
        'finish it first')
  dataset_info = data_lib.DATASETS[config.dataset]
  model = models.make_model(info['model'], input_mean=dataset_info.mean,
                            input_std=dataset_info.std,
                            num_classes=config.student.num_classes)
  template = models.init_variables(model, jax.random.PRNGKey(0),
                                   dataset_info.image_shape)
  external = stages_lib.loaded_teachers(config)
  if stage == 'teacher' and external:
    path, what = external[0], 'config.teacher.checkpoint'
  else:
    path = workdir_lib.Workdir(workdir, writes=False).checkpoint_dir(stage)
    what = f'the {stage} stage\'s checkpoints'
  variables = checkpoints_lib.load_variables(path, template, what=what)
  return LoadedStage(stage, info['model'], model, variables, info,
                     tuple(dataset_info.image_shape))


def reference_stage(config: ml_collections.ConfigDict,
                    results: dict[str, Any], stage: str) -> str | None:
  """The stage to compare `stage` with in a report: the first stage it was
  distilled from, else the finished teacher (None for the teacher itself
  or when there is none)."""
  info = results['stages'][stage]
  taught_by = [n for n in info.get('distilled_from', '').split(',') if n]
  if taught_by:
    return taught_by[0]
  teacher = stage_names(config)[0]
  if stage != teacher and teacher in results['stages']:
    return teacher
  return None


def inference_program(loaded: LoadedStage) -> InferenceProgram:
  """images `(B, H, W, C)` float32 in [0, 1] -> logits `(B, K)`, inference
  mode, the variables held as constants."""
  model, variables = loaded.model, loaded.variables

  def logits(images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False)

  return logits


def to_jax_export(program: InferenceProgram,
                  image_shape: Sequence[int]) -> bytes:
  """`program` serialised by `jax.export` (StableHLO, a symbolic batch
  dimension, for CPU): reload it with `jax.export.deserialize(blob)` and run
  `.call(images)`, without kd_jax's code."""
  batch, = jax.export.symbolic_shape('batch')
  exported = jax.export.export(jax.jit(program), platforms=['cpu'])(
      jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32))
  return bytes(exported.serialize())


def run_jax_export(blob: bytes, images: np.ndarray) -> np.ndarray:
  """Logits `(B, K)` of a `to_jax_export` program for images `(B, H, W, C)`."""
  return np.asarray(jax.export.deserialize(bytearray(blob)).call(images))


def to_onnx(program: InferenceProgram, image_shape: Sequence[int],
            name: str) -> bytes:
  """`program` as an ONNX model (jax2onnx): input `images` float32
  `(batch, H, W, C)`, output `logits` `(batch, K)`."""
  import jax2onnx  # pylint: disable=g-import-not-at-top
  # jax2onnx reports each converted module on stdout and in its logs.
  for logger in list(pylogging.root.manager.loggerDict):
    if logger.split('.')[0] in ('jax2onnx', 'onnx_ir', 'onnxscript'):
      pylogging.getLogger(logger).setLevel(pylogging.ERROR)
  with contextlib.redirect_stdout(io.StringIO()):
    proto = jax2onnx.to_onnx(program, [('batch', *image_shape)],
                             model_name=name, input_names=['images'],
                             output_names=['logits'])
  return proto.SerializeToString()


def onnx_session(blob: bytes):
  """An onnxruntime CPU session of an ONNX model."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # Errors only.
  return onnxruntime.InferenceSession(blob, options,
                                      providers=['CPUExecutionProvider'])


def run_onnx(session, images: np.ndarray, batch_size: int = 500
             ) -> np.ndarray:
  """Logits `(N, K)` of an ONNX session for images `(N, H, W, C)`."""
  return np.concatenate([
      session.run(['logits'], {'images': images[i:i + batch_size]})[0]
      for i in range(0, len(images), batch_size)])


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
  """How closely exported logits `(N, K)` follow kd_jax's own `(N, K)`: the
  largest absolute difference, the largest |logit| of kd_jax's (the scale
  that difference is judged against), and the fraction of equal
  predictions."""
  return {
      'max_abs_diff': float(np.max(np.abs(reference - other))),
      'max_abs_logit': float(np.max(np.abs(reference))),
      'argmax_agreement': float(np.mean(reference.argmax(-1)
                                        == other.argmax(-1))),
  }
