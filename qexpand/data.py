"""TREC topics as (query, description) pairs, and the seeded train/eval/test split.

Topics come from ir_datasets. A topic's short form is its `title` (or `query`/`text`, depending on
the topic set's query class) and its target is its `description`; the `narrative` (empty where the
topic set has none) is kept for scoring what an expansion adds. The split is made over groups of
topics whose queries are identical after normalisation, so the same query text never sits on both
sides of a split (Robust04 has "airport security" twice).
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from qexpand.errors import UserError

DEFAULT_DATASETS = (
    "clueweb09/catb/trec-web-2009",
    "disks45/nocr/trec-robust-2004",
    "gov/trec-web-2002",
)
# The topic sets whose files sit in ../shared/ir_datasets beside a checkout (548 topics with a
# description), by family: a family shares its collection and its way of phrasing topics.
OFFLINE_GROUPS = {
    "web": ("clueweb09/catb/trec-web-2009", "clueweb12/trec-web-2013", "clueweb12/trec-web-2014"),
    "robust04": ("disks45/nocr/trec-robust-2004",),
    "terabyte": ("gov2/trec-tb-2004", "gov2/trec-tb-2005", "gov2/trec-tb-2006"),
}
OFFLINE_DATASETS = ("clueweb09/catb/trec-web-2009", "disks45/nocr/trec-robust-2004", "gov2/trec-tb-2004",
                    "gov2/trec-tb-2005", "gov2/trec-tb-2006", "clueweb12/trec-web-2013", "clueweb12/trec-web-2014")
SHARED_TOPICS = Path(__file__).resolve().parent.parent.parent / "shared" / "ir_datasets"
DEFAULT_SPLIT = (280, 35, 35)
DEFAULT_SEED = 42
SPLIT_NAMES = ("train", "eval", "test")

# Field names that hold the short query, in order of preference, across ir_datasets query classes.
QUERY_FIELDS = ("title", "query", "text")
DESCRIPTION_FIELD = "description"
NARRATIVE_FIELD = "narrative"
# What the model learns to write after the query: the description, or the description followed by the
# narrative's positive sentences (what a relevant document holds, more terms for a retrieval engine).
TARGETS = ("description", "description+narrative")
SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
# A narrative sentence about what is NOT wanted would teach the model to add the very terms to avoid.
EXCLUDING = re.compile(r"\b(not|irrelevant|non-relevant|nonrelevant|unless|except|excluding)\b", re.IGNORECASE)
# The judges' stock framing ("A relevant document must identify", "... is relevant"): it names no topic.
STOCK_FRAMING = re.compile(
    r"\b(a|any|the)?\s*(relevant\s+)?(documents?|docs?|reports?|articles?)\s+(which|that)?\s*"
    r"(must|should|will|would|may|might|can|could|need to|needs to|to be relevant)?\s*(also\s+)?"
    r"(as a minimum\s+)?(contain|include|identify|discuss|describe|mention|provide|give|report|cite|"
    r"focus on|address|be about)?s?\b|\b(is|are|would be|will be)\s+(also\s+)?relevant\b|\brelevant\b",
    re.IGNORECASE)


@dataclass(frozen=True)
class Topic:
    dataset: str
    query_id: str
    query: str
    description: str
    # Default "" so split.json files written before the narrative was kept still load.
    narrative: str = ""


def positive_narrative(narrative: str) -> str:
    """The sentences of a narrative that say what is wanted, without the judges' stock framing."""
    kept = []
    for sentence in SENTENCE_END.split(narrative):
        if sentence.strip() and not EXCLUDING.search(sentence):
            unframed = normalise_whitespace(STOCK_FRAMING.sub(" ", sentence))
            text = re.sub(r"\s+([.,;:?!)])", r"\1", unframed).strip(" ,:;")
            if len(text.split()) >= 2:
                kept.append(text[0].upper() + text[1:])
    return " ".join(kept)


def training_target(topic: Topic, target: str) -> str:
    """The text the model learns to write for a topic (see TARGETS)."""
    if target == "description+narrative":
        return normalise_whitespace(f"{topic.description} {positive_narrative(topic.narrative)}")
    return topic.description


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def query_key(query: str) -> str:
    """Queries equal under this key count as the same query for the split."""
    return normalise_whitespace(query).casefold()


def _wanted_files(handler) -> list[tuple[str, list[str]]]:
    """(cache path, download URLs) of every file an ir_datasets queries handler reads.

    ir_datasets keeps these on `Download` objects nested inside the handler; walking the
    attributes finds them without depending on one handler class.
    """
    found, stack, seen = [], [handler], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        if "_cache_path" in vars(obj):
            urls = [getattr(m, "url", str(m)) for m in getattr(obj, "mirrors", [])]
            found.append((str(obj._cache_path), urls))
        stack.extend(v for v in vars(obj).values() if type(v).__module__.startswith("ir_datasets"))
    return found


def _load_dataset(dataset_id: str):
    import ir_datasets

    try:
        return ir_datasets.load(dataset_id)
    except KeyError:
        raise UserError(
            f"unknown data set id '{dataset_id}'. Use an ir_datasets id such as "
            f"'{DEFAULT_DATASETS[1]}' (the catalogue is at https://ir-datasets.com)."
        ) from None


def load_topics(dataset_id: str, require_description: bool = True) -> list[Topic]:
    """All topics of one ir_datasets topic set, with whitespace normalised.

    With `require_description` off (expanding queries needs none), a topic set without
    descriptions is read too, and a missing description is the empty string.
    """
    dataset = _load_dataset(dataset_id)
    if not dataset.has_queries():
        raise UserError(f"data set '{dataset_id}' has no topics (queries); choose a topic set.")
    fields = dataset.queries_cls()._fields
    query_field = next((f for f in QUERY_FIELDS if f in fields), None)
    if query_field is None or (require_description and DESCRIPTION_FIELD not in fields):
        raise UserError(
            f"the topics of '{dataset_id}' have the fields {', '.join(fields)}, but a title/query "
            f"field and a '{DESCRIPTION_FIELD}' field are needed. Choose a topic set with "
            f"descriptions, such as the TREC ad hoc, Robust or Web track topics."
        )
    try:
        raw = list(dataset.queries_iter())
    except Exception as error:  # ir_datasets raises plain RuntimeError/OSError on failed downloads
        raise _download_error(dataset_id, dataset, error) from None
    topics = []
    for item in raw:
        query = normalise_whitespace(getattr(item, query_field) or "")
        description = normalise_whitespace(getattr(item, DESCRIPTION_FIELD, "") or "")
        narrative = normalise_whitespace(getattr(item, NARRATIVE_FIELD, "") or "")
        if query and (description or not require_description):
            topics.append(Topic(dataset_id, str(item.query_id), query, description, narrative))
    if not topics:
        raise UserError(f"no topic of '{dataset_id}' has both a query and a description.")
    return topics


def _download_error(dataset_id: str, dataset, error: Exception) -> UserError:
    import ir_datasets

    files = _wanted_files(dataset.queries_handler())
    where = "; ".join(
        f"{path}" + (f" (downloaded from {urls[0]})" if urls else "") for path, urls in files
    ) or "(ir_datasets did not say which file)"
    home = ir_datasets.util.home_path()
    first_line = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return UserError(
        f"could not read the topics of '{dataset_id}': {first_line}. ir_datasets wanted the file "
        f"{where}. With network access it downloads it; offline, put the file at that path (the "
        f"cache folder is set by IR_DATASETS_HOME, now {home}), or leave this data set out with "
        f"--datasets."
    )


def load_all_topics(dataset_ids: list[str]) -> list[Topic]:
    # ir_datasets logs every failed download try at INFO/WARNING; our own error says it once.
    logging.getLogger("ir_datasets").setLevel(logging.ERROR)
    topics = []
    for dataset_id in dataset_ids:
        topics.extend(load_topics(dataset_id))
    return topics


def query_groups(topics: list[Topic], seed: int) -> list[list[Topic]]:
    """Topics grouped by identical query (`query_key`), the groups in a seeded random order that
    depends only on the topics and the seed, not on the order they came in."""
    groups: dict[str, list[Topic]] = defaultdict(list)
    for topic in sorted(topics, key=lambda t: (t.dataset, t.query_id)):
        groups[query_key(topic.query)].append(topic)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    return [groups[key] for key in order]


def split_topics(topics: list[Topic], counts: tuple[int, int, int], seed: int) -> dict[str, list[Topic]]:
    """Seeded split into train/eval/test of exactly `counts` topics, grouping identical queries.

    Groups are shuffled with `seed`; test is filled first, then eval, then train, each taking whole
    groups that still fit. The result depends only on the topics, the counts and the seed.
    """
    needed = sum(counts)
    if needed > len(topics):
        raise UserError(
            f"the split asks for {needed} topics ({counts[0]} train + {counts[1]} eval + "
            f"{counts[2]} test) but the data sets hold only {len(topics)}. Lower the counts with "
            f"--split, e.g. --split {max(len(topics) - counts[1] - counts[2], 1)} {counts[1]} {counts[2]}."
        )
    split: dict[str, list[Topic]] = {}
    remaining = query_groups(topics, seed)
    for name, count in zip(("test", "eval", "train"), (counts[2], counts[1], counts[0])):
        chosen, left = [], []
        for group in remaining:
            if len(chosen) + len(group) <= count:
                chosen.extend(group)
            else:
                left.append(group)
        split[name] = chosen
        if len(split[name]) != count:
            raise UserError(f"could not fill the {name} split with exactly {count} topics; change --split.")
        remaining = left
    return {name: split[name] for name in SPLIT_NAMES}


def limit_topics(topics: list[Topic], limit: int, seed: int) -> list[Topic]:
    """A seeded sample of at most `limit` topics made of whole query groups."""
    chosen: list[Topic] = []
    for group in query_groups(topics, seed):
        if len(chosen) + len(group) <= limit:
            chosen.extend(group)
    return chosen


def make_folds(topics: list[Topic], k: int, seed: int) -> list[list[Topic]]:
    """Deal whole query groups into k folds, each group to the currently smallest fold."""
    folds: list[list[Topic]] = [[] for _ in range(k)]
    for group in query_groups(topics, seed):
        min(folds, key=len).extend(group)
    return folds


def hold_out(test: list[Topic], rest: list[Topic], eval_size: int, seed: int) -> dict[str, list[Topic]]:
    """test as given; eval = `eval_size` topics (whole query groups) of `rest`; train = the others of
    `rest`. Topics of `rest` whose query is also a test query are dropped."""
    test_queries = {query_key(t.query) for t in test}
    rest = [t for t in rest if query_key(t.query) not in test_queries]
    eval_count = min(eval_size, len(rest) - 1)  # leave at least one training topic (tiny runs)
    side = split_topics(rest, (len(rest) - eval_count, eval_count, 0), seed)
    return {"train": side["train"], "eval": side["eval"], "test": list(test)}


def topic_groups(dataset_ids: list[str]) -> dict[str, list[str]]:
    """The offline groups (qexpand.OFFLINE_GROUPS) among `dataset_ids`; any other set alone."""
    groups = {name: [d for d in ids if d in dataset_ids] for name, ids in OFFLINE_GROUPS.items()}
    grouped = {d for ids in groups.values() for d in ids}
    groups.update({d: [d] for d in dataset_ids if d not in grouped})
    return {name: ids for name, ids in groups.items() if ids}


def split_to_json(split: dict[str, list[Topic]], seed: int, dataset_ids: list[str]) -> dict:
    return {
        "seed": seed,
        "datasets": list(dataset_ids),
        "counts": {name: len(split[name]) for name in SPLIT_NAMES},
        **{name: [asdict(t) for t in split[name]] for name in SPLIT_NAMES},
    }


def split_from_json(data: dict) -> dict[str, list[Topic]]:
    return {name: [Topic(**t) for t in data[name]] for name in SPLIT_NAMES}


def read_split_file(path: str) -> dict:
    """A split.json (of a run directory, or one in that format) for --split-file, checked."""
    import json

    try:
        split_json = json.loads(Path(path).read_text(encoding="utf-8"))
        split_from_json(split_json)
        if not all(split_json[name] for name in SPLIT_NAMES):
            raise ValueError("a split is empty")
        return split_json
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--split-file {path} is not a usable split file ({error}); give the split.json "
                        "of a run directory or one in the same format.") from None
