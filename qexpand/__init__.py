"""Shared code of the query-expansion fine-tuning scripts.

`training.py` and `testing_finetuned_model.py` at the top of the repository are the entry points;
this package holds what both need: the data split, the prompt, model loading, generation, metrics
and the run directory layout. `from qexpand import Expander` expands queries with a finished run
from Python (qexpand/expander.py); `qexpand.pyterrier.QueryExpander` does it in a PyTerrier pipeline.
"""


def __getattr__(name: str):
    # Expander is imported on first use: importing it loads torch and transformers, which every other
    # `from qexpand import ...` (options, errors, the topic files) would otherwise pay for.
    if name == "Expander":
        from qexpand.expander import Expander

        return Expander
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Expander"]
