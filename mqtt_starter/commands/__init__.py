"""The operator's commands besides `run`: check, tasks, demo."""
