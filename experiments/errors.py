"""The error every entry point raises for a flag or input file it rejects itself (experiments.cli reports it as one
line); a module of its own so that the checks cli runs (output_checks, input_checks) need not import cli."""


class UsageError(ValueError):
    """A flag combination or input file that the entry point itself rejects."""
