"""Using a trained adapter: load it (typed, from the job saved beside it), predict, evaluate, merge and export,
compose."""
