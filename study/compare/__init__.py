"""The course report's comparisons: factors, their runs and their verdicts."""
