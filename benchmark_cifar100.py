r"""The CIFAR-100 benchmark table: teacher -> student pairs x methods x seeds.

  python benchmark_cifar100.py --methods=kd,dkd --seeds=0,1,2

An installed kd_jax has the same command as `kd-jax-cifar100`. The code, and
every flag, is in `kd_jax/benchmark_main.py`.
"""

from kd_jax import benchmark_main

if __name__ == '__main__':
  benchmark_main.console_main()
