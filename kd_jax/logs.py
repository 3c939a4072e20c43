"""Where metrics go besides metrics.jsonl: TensorBoard and progress bars.

`TensorBoardWriter` writes each stage's epoch metrics as TensorBoard scalars
(tensorboardX event files, readable by `tensorboard --logdir=<workdir>/
tensorboard`; no TensorFlow needed). `progress` is a tqdm bar with an ETA that
draws nothing when its output is not a terminal (logs, CI, pipes).
"""

from collections.abc import Mapping
import os
import sys
from typing import IO

import jax
import tqdm


class TensorBoardWriter:
  """Scalars per stage under `directory/<stage>/`, one event file each."""

  def __init__(self, directory: str):
    self.directory = directory
    self._writers = {}
    self._purge_steps = {}

  def resume(self, stage: str, step: int) -> None:
    """`stage` continues at `step`: TensorBoard will drop the events that
    earlier runs wrote at `step` and after, so re-run epochs show once."""
    self._purge_steps[stage] = step

  def write(self, stage: str, step: int,
            scalars: Mapping[str, float]) -> None:
    """Writes `scalars` (name -> value, e.g. 'test/accuracy') at `step`."""
    if stage not in self._writers:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writers[stage] = tensorboardX.SummaryWriter(
          os.path.join(self.directory, stage), flush_secs=10,
          purge_step=self._purge_steps.pop(stage, None))
    writer = self._writers[stage]
    for name, value in scalars.items():
      writer.add_scalar(name, value, step)
    writer.flush()

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers = {}


def progress(total: int, desc: str, *, initial: int = 0, unit: str = 'step',
             file: IO[str] | None = None) -> tqdm.tqdm:
  """A progress bar with rate and ETA, silent unless `file` is a terminal.

  Args:
    total: number of units of the whole loop.
    desc: what is running, e.g. 'teacher epoch 2/5'.
    initial: units already done (a resumed epoch).
    unit: what one unit is.
    file: where to draw; stderr by default.

  Returns:
    A `tqdm.tqdm`; call `.update(n)` and `.close()`. `.disable` is True when
    nothing is drawn (also in every process but process 0 of a multi-process
    run), so callers can skip work done only for the bar.
  """
  file = sys.stderr if file is None else file
  silent = not _is_terminal(file) or jax.process_index() != 0
  return tqdm.tqdm(total=total, desc=desc, initial=initial, unit=unit,
                   file=file, disable=silent,
                   dynamic_ncols=True, leave=False)


def _is_terminal(file: IO[str]) -> bool:
  try:
    return file.isatty()
  except (AttributeError, ValueError):  # No isatty, or closed.
    return False
