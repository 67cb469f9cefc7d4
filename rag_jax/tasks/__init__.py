"""Tasks: one module per task (its data format, generator input and target, evaluator); registry.py names them."""
