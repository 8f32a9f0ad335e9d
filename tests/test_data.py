"""Topic loading through ir_datasets (three file formats) and the seeded, grouped split."""

import pytest

from qexpand import data
from qexpand.errors import UserError


def test_loads_each_topic_format(topics_home):
    web = data.load_topics("clueweb09/catb/trec-web-2009")  # TREC Web XML
    robust = data.load_topics("disks45/nocr/trec-robust-2004")  # gzipped <top> SGML
    gov = data.load_topics("gov/trec-web-2002")
    assert (len(web), len(robust), len(gov)) == (12, 19, 10)
    first = web[0]
    assert (first.dataset, first.query_id, first.query) == ("clueweb09/catb/trec-web-2009", "1", "solar panels")
    # Line breaks and runs of spaces inside a description become single spaces.
    assert first.description == "What are the main facts about solar panels and where can one learn more?"
    assert robust[0].query_id == "301" and robust[0].query == "wine regions"


def test_split_is_deterministic_and_exact(topics_home):
    topics = data.load_all_topics(list(data.DEFAULT_DATASETS))
    first = data.split_topics(topics, (30, 5, 5), seed=7)
    again = data.split_topics(list(reversed(topics)), (30, 5, 5), seed=7)
    other = data.split_topics(topics, (30, 5, 5), seed=8)
    assert {k: len(v) for k, v in first.items()} == {"train": 30, "eval": 5, "test": 5}
    assert first == again
    assert first["test"] != other["test"]


@pytest.mark.parametrize("seed", range(10))
def test_identical_queries_never_straddle_splits(topics_home, seed):
    topics = data.load_all_topics(list(data.DEFAULT_DATASETS))
    split = data.split_topics(topics, (31, 5, 5), seed=seed)
    sides = {name: {data.query_key(t.query) for t in split[name]} for name in split}
    assert not sides["train"] & sides["test"]
    assert not sides["train"] & sides["eval"] and not sides["eval"] & sides["test"]
    ids = [(t.dataset, t.query_id) for name in split for t in split[name]]
    assert len(ids) == len(set(ids)) == 41


def test_split_round_trips_through_json(topics_home):
    topics = data.load_all_topics(list(data.DEFAULT_DATASETS))
    split = data.split_topics(topics, (30, 5, 5), seed=1)
    assert data.split_from_json(data.split_to_json(split, 1, list(data.DEFAULT_DATASETS))) == split


def test_too_few_topics_says_how_many_exist(topics_home):
    topics = data.load_all_topics(list(data.DEFAULT_DATASETS))
    with pytest.raises(UserError, match=r"asks for 350 topics .* hold only 41"):
        data.split_topics(topics, data.DEFAULT_SPLIT, seed=42)


def test_unknown_dataset_id(topics_home):
    with pytest.raises(UserError, match="unknown data set id 'no/such-set'"):
        data.load_topics("no/such-set")


def test_topic_set_without_descriptions(topics_home):
    # ANTIQUE's queries have only an id and a text: refused before any download is tried.
    with pytest.raises(UserError, match="description"):
        data.load_topics("antique/test")
