"""How trials are run: the opening of a run, its budget, the standard and batched engines."""
