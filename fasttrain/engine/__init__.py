"""The engine: the training step and loop (trainer), optimizer and schedule (optim), linear
evaluation, checkpoints and measurements."""
