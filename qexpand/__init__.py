"""Shared code of the query-expansion fine-tuning scripts.

`training.py` and `testing_finetuned_model.py` at the top of the repository are the entry points;
this package holds what both need: the data split, the prompt, model loading, generation, metrics
and the run directory layout.
"""
