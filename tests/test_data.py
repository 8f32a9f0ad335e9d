"""Topic loading through ir_datasets (three file formats) and the seeded, grouped split."""

import os
from pathlib import Path

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


def test_narrative_is_kept_and_old_split_files_still_load(topics_home):
    robust = data.load_topics("disks45/nocr/trec-robust-2004")
    web = data.load_topics("clueweb09/catb/trec-web-2009")
    assert robust[0].narrative == "Documents about wine regions are relevant."
    assert web[0].narrative == ""  # the Web track topics have no narrative
    split = data.split_topics(robust + web, (21, 5, 5), seed=3)
    old = data.split_to_json(split, 3, ["x"])
    for name in data.SPLIT_NAMES:  # a split.json written before the narrative was kept
        old[name] = [{k: v for k, v in t.items() if k != "narrative"} for t in old[name]]
    assert data.split_from_json(old)["test"][0].narrative == ""


def topic_file_path(dataset_id: str) -> Path:
    """Where ir_datasets reads this set's topics: fixed when ir_datasets is first imported, so in a
    test session under the IR_DATASETS_HOME of the first test that loaded topics."""
    import ir_datasets

    path = Path(data._wanted_files(ir_datasets.load(dataset_id).queries_handler())[0][0])
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_terabyte_and_web2013():
    """One topic file in each format of the Terabyte (plain <top> SGML) and Web 2013 (XML, <query>) sets."""
    topic_file_path("gov2/trec-tb-2004").write_text(
        "<top>\n<num> Number: 701\n\n<title> U.S. oil industry history\n\n<desc> Description:\nDescribe the "
        "history of the U.S. oil industry\n\n<narr> Narrative:\nRelevant documents will include those on\n"
        "historical exploration.\n\n</top>\n")
    topic_file_path("clueweb12/trec-web-2013").write_text(
        '<webtrack2013>\n<topic number="201" type="faceted">\n  <query>raspberry pi</query>\n  <description>'
        'What is a raspberry pi?\n  </description>\n  <subtopic number="1" type="inf">What is a raspberry pi?'
        '</subtopic>\n</topic>\n</webtrack2013>\n')


def test_terabyte_and_web2013_formats(topics_home):
    write_terabyte_and_web2013()
    tb, web = data.load_all_topics(["gov2/trec-tb-2004", "clueweb12/trec-web-2013"])
    assert (tb.query, tb.description) == ("U.S. oil industry history", "Describe the history of the U.S. oil industry")
    assert tb.narrative == "Relevant documents will include those on historical exploration."
    assert (web.query, web.description, web.narrative) == ("raspberry pi", "What is a raspberry pi?", "")


OFFLINE_SETS = {"clueweb09/catb/trec-web-2009": 50, "disks45/nocr/trec-robust-2004": 250, "gov2/trec-tb-2004": 50,
                "gov2/trec-tb-2005": 50, "gov2/trec-tb-2006": 50, "clueweb12/trec-web-2013": 50,
                "clueweb12/trec-web-2014": 48}  # two Web 2014 topics have no description


@pytest.mark.skipif(not data.SHARED_TOPICS.is_dir(), reason="the shared offline topic files are not here")
def test_all_offline_topic_sets_load(tmp_path):
    # In a fresh process: ir_datasets fixes its file paths when first imported.
    import json
    import shutil
    import subprocess
    import sys

    shutil.copytree(data.SHARED_TOPICS, tmp_path / "irds")
    code = ("import json; from qexpand import data; topics = data.load_all_topics(list(data.OFFLINE_DATASETS)); "
            "print(json.dumps([[t.dataset, bool(t.narrative)] for t in topics]))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "IR_DATASETS_HOME": str(tmp_path / "irds")},
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    topics = json.loads(done.stdout.splitlines()[-1])
    assert tuple(OFFLINE_SETS) == data.OFFLINE_DATASETS
    assert {d: sum(t[0] == d for t in topics) for d in OFFLINE_SETS} == OFFLINE_SETS
    with_narrative = {dataset for dataset, has_narrative in topics if has_narrative}
    assert with_narrative == {"disks45/nocr/trec-robust-2004", "gov2/trec-tb-2004", "gov2/trec-tb-2005", "gov2/trec-tb-2006"}


def test_the_narrative_target_keeps_what_is_wanted_without_the_judges_framing():
    topic = data.Topic("robust", "1", "dam removal", "Where have dams been removed?",
                       "Relevant documents must identify specific places where dams have been removed. "
                       "Applications for removal are not relevant unless reasons are given. "
                       "Discussion of the environmental impact of removal is relevant.")
    kept = data.positive_narrative(topic.narrative)
    assert kept == ("Specific places where dams have been removed. "
                    "Discussion of the environmental impact of removal.")
    assert data.training_target(topic, "description") == "Where have dams been removed?"
    assert data.training_target(topic, "description+narrative") == "Where have dams been removed? " + kept
    # A topic set without narratives (the Web tracks) trains on the description alone either way.
    web = data.Topic("web", "2", "raspberry pi", "What is a raspberry pi?")
    assert data.training_target(web, "description+narrative") == "What is a raspberry pi?"
