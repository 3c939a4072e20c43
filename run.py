r"""Runs a kd_jax experiment: flags -> config -> `kd_jax.experiment.run`.

  python run.py --config=experiments/seed.py --workdir=runs/seed
  python run.py --config=experiments/seed.py:quick --workdir=/tmp/x
  python run.py --config.distill.kd.temperature=4 --config.seed=3
  python run.py --config=experiments/seed.py:strong --config.num_seeds=5

Several processes (hosts), each running the same command (see README):
  python run.py --multihost ...                      # TPU pod slice, Slurm, MPI
  python run.py --coordinator_address=host0:1234 --num_processes=2 \
      --process_id=0 ...                             # anywhere else

An installed kd_jax has the same command as `kd-jax-run`. The code is
`kd_jax/main.py`: the logic lives in the library, where it can be imported
and tested.
"""

from kd_jax import main

if __name__ == '__main__':
  main.console_main()
