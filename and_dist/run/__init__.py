"""A run's lifecycle, shared by train, probe and evaluate: the entry scaffold (entry), the loop of
steps (loop, step_timer), checkpoints, run directories, and stopping on a signal (stop)."""
