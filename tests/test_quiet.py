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
