"""A normal run of either script prints the scripts' own lines and bars, not library noise, also when its
main() is called from Python (where no command-line logging set-up runs)."""

from __future__ import annotations

import logging
import warnings

NOISE = ("Loading weights", "{'loss'", "Could not find a config file", "kernels-community")


def test_mains_called_from_python_print_no_library_noise(tmp_path, tiny_model, topics_home, capfd):
    import testing_finetuned_model
    import training

    filters_before = list(warnings.filters)
    run_dir = training.main(training.parse_config([
        "--model", str(tiny_model), "--split", "30", "5", "5", "--epochs", "2", "--batch-size", "8",
        "--output-dir", str(tmp_path), "--run-name", "quiet"]))
    printed = "".join(capfd.readouterr())
    assert not [n for n in NOISE if n in printed], printed[-3000:]
    assert "8/8 [" in printed  # the training bar (4 steps an epoch) stays
    assert printed.count("'eval_loss'") == 2  # one line per epoch's eval pass, none per step

    testing_finetuned_model.main(testing_finetuned_model.parse_config(["--run", str(run_dir), "--max-new-tokens", "8"]))
    printed = "".join(capfd.readouterr())
    assert not [n for n in NOISE if n in printed], printed[-3000:]
    assert "generating" in printed and "SBERT" in printed  # its own bar and its score table
    # The caller's logging and warning filters are as they were.
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.NOTSET
    assert warnings.filters == filters_before


def test_main_in_a_fresh_interpreter_hides_the_import_time_messages(tmp_path, tiny_model, topics_home):
    """bitsandbytes says at import, on CPUs with AVX512-BF16, that an optional kernel package is missing:
    only a fresh interpreter shows whether main() hides it (the test process imported it long ago)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import training; training.main(training.parse_config(['--model', %r, '--split', '30', '5', '5', "
            "'--epochs', '1', '--batch-size', '8', '--output-dir', %r, '--run-name', 'fresh']))"
            % (str(tiny_model), str(tmp_path)))
    env = {**os.environ, "IR_DATASETS_HOME": str(topics_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert not [n for n in NOISE if n in printed], printed[-3000:]
    assert "4/4 [" in printed and printed.count("'eval_loss'") == 1
