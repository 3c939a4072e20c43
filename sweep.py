r"""Runs a sweep: one experiment config x a grid of overrides (x seeds).

  python sweep.py --config=experiments/seed.py:strong \
      --grid=distill.kd.temperature=1,2,4,10,20 --grid=seed=0,1,2,3,4

An installed kd_jax has the same command as `kd-jax-sweep`. The code, and
every flag, is in `kd_jax/sweep_main.py`.
"""

from kd_jax import sweep_main

if __name__ == '__main__':
  sweep_main.console_main()
