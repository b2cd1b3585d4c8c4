"""What a study says: summaries, analysis, plots, reports, the dashboard note, TensorBoard runs."""
