r"""Compares the distillation methods on Fashion-MNIST from one teacher.

  python compare_methods.py --seeds=0,1,2

An installed kd_jax has the same command as `kd-jax-compare`. The code, and
every flag, is in `kd_jax/compare_main.py`.
"""

from kd_jax import compare_main

if __name__ == '__main__':
  compare_main.console_main()
