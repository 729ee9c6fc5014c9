"""Training programs built on the maxup_jax library: input, loops, checkpoints, metrics.

`run(config, workdir)` dispatches on `config.task`.
"""

TASKS = ("image", "language")


def run(config, workdir: str) -> dict:
  """Runs the task a config names; returns its summary."""
  task = config.task
  if task == "image":
    from trainer import image
    return image.train_and_evaluate(config, workdir)
  if task == "language":
    from trainer import language
    return language.train_and_evaluate(config, workdir)
  raise ValueError(f"config.task={task!r}; valid: {list(TASKS)}")
