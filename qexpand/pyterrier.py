"""Query expansion with a finished run as a PyTerrier transformer.

    import pyterrier as pt
    from qexpand.pyterrier import QueryExpander

    pipeline = QueryExpander("checkpoints/RUN") >> pt.terrier.Retriever(index, wmodel="BM25")
    pipeline.transform(topics)            # topics: a DataFrame with qid and query

As PyTerrier's own rewriters do, the original query moves to `query_0` (an earlier `query_0` to
`query_1`, and so on: pt.model.push_queries) and `query` gets the expanded query: the one
`testing_finetuned_model.py --topics` writes (qexpand.Expander, same options), reduced to letters,
digits and single spaces so that Terrier's query language reads it as plain terms.

PyTerrier is imported when `QueryExpander` is first used, not with `qexpand`: it is needed for this
module only. Expanding needs no Java and no Terrier jars; a Terrier retriever after it does.
"""

from __future__ import annotations

import re

from qexpand.errors import UserError

# Runs of anything but a letter or a digit. Terrier's query language reads many of those characters as its
# own syntax (':' control values, '+'/'-' requirements, '^' weights, quotes, brackets, '#' operators) and
# refuses or misreads a query holding them; pyterrier 1.1.2 has no public helper that strips them without Java
# (pt.rewrite.tokenise runs Terrier's Java tokeniser), so they become spaces here, as that tokeniser splits on them.
NOT_A_TERM_CHARACTER = re.compile(r"[\W_]+")


def terrier_safe(text: str) -> str:
    """The words of `text` (letters and digits) separated by single spaces."""
    return " ".join(NOT_A_TERM_CHARACTER.sub(" ", text).split())


def import_pyterrier():
    try:
        import pyterrier
    except ImportError:
        raise UserError("qexpand.pyterrier needs PyTerrier: pip install pyterrier==1.1.2 (the version "
                        "requirements.txt pins). Expanding queries needs neither Java nor Terrier's jars.") from None
    return pyterrier


def define_query_expander():
    """The QueryExpander class, defined once pyterrier is imported (its base class comes from there)."""
    pt = import_pyterrier()
    import pandas as pd

    from qexpand.expander import Expander

    class QueryExpander(pt.Transformer):
        """Rewrites each query of a query frame (qid, query) into its expansion by a fine-tuned run.

        run_dir and options are those of Expander.from_run: the run (a path or a name under output_dir)
        and the test script's options for decoding and query shaping (num_candidates=4, ...)."""

        def __init__(self, run_dir, output_dir="checkpoints", **options):
            self.expander = Expander.from_run(run_dir, output_dir, **options)

        def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
            pt.validate.query_frame(inp, extra_columns=["query"], context=self)
            out = pt.model.push_queries(inp)  # query -> query_0 (query_0 -> query_1, ...), on a copy
            expanded = self.expander.expand(out["query_0"].tolist()) if len(out) else []
            out["query"] = [terrier_safe(query) for query in expanded]
            return out

        def __repr__(self) -> str:
            return f"QueryExpander({str(self.expander.run_dir)!r})"

    QueryExpander.__module__, QueryExpander.__qualname__ = __name__, "QueryExpander"
    return QueryExpander


def __getattr__(name: str):
    # PEP 562: the class is made on first access (`from qexpand.pyterrier import QueryExpander`), so a
    # missing pyterrier is reported then, as a UserError, and importing this module costs nothing.
    if name == "QueryExpander":
        globals()[name] = define_query_expander()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
