"""Example experiment configs (ml_collections), one module per experiment:
`python run.py --config=experiments/<name>.py`. Installed with kd_jax as a
second top-level package."""
