"""The speed machinery of qexpand.accel: installed only while it is used, never on the stock path, and
refused on library versions it was not checked on."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest

TINY_RUN = ("--split", "8", "2", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu")


def train_in_process(tiny_model, output_dir, monkeypatch, *flags):
    """training.main on the tiny model; returns the model and Trainer it trained, and what was in force
    while the Trainer trained."""
    from transformers import Trainer

    import training
    from qexpand.accel import lora_kernels

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = {}
    load_model, stock_train = training.load_model, Trainer.train

    def recording_load_model(*args, **kwargs):
        seen["model"], tokenizer = load_model(*args, **kwargs)
        return seen["model"], tokenizer

    def recording_train(trainer, *args, **kwargs):
        seen["trainer"] = trainer
        seen["during"] = installed(trainer.model, trainer, lora_kernels.OPTIMIZER_STEPS)
        return stock_train(trainer, *args, **kwargs)

    monkeypatch.setattr(training, "load_model", recording_load_model)
    monkeypatch.setattr(Trainer, "train", recording_train)
    config = training.parse_config(["--model", str(tiny_model), *TINY_RUN, "--output-dir", str(output_dir), *flags])
    training.main(config)
    seen["after"] = installed(seen["model"], seen["trainer"], lora_kernels.OPTIMIZER_STEPS)
    return seen


def installed(model, trainer, step_counter) -> dict:
    """What of the speed machinery is in place: replaced forwards and attributes on the model's modules,
    the rotary function inside transformers, the optimizer-step hook, the Trainer's replaced methods."""
    from torch.optim import optimizer as torch_optimizer
    from transformers.models.mistral import modeling_mistral

    from qexpand.accel.lora_kernels import FUSED_LAYER_ATTRIBUTES

    patched_modules = sorted({attribute for module in model.modules() for attribute in FUSED_LAYER_ATTRIBUTES
                              if attribute in vars(module)})
    our_hooks = [hook for hook in torch_optimizer._global_optimizer_post_hooks.values()
                 if getattr(hook, "__self__", None) is step_counter]
    return {
        "module attributes": patched_modules,
        "rotary replaced": isinstance(modeling_mistral.apply_rotary_pos_emb, functools.partial),
        "optimizer step hooks": len(our_hooks),
        "trainer methods": sorted({"_get_train_sampler", "floating_point_ops"} & set(vars(trainer))),
    }


def test_nothing_of_the_speed_ups_stays_installed_after_training_main_returns(
        tmp_path, tiny_model, topics_home, monkeypatch):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from torch.optim import optimizer as torch_optimizer

    from qexpand.accel.lora_kernels import OPTIMIZER_STEPS

    def others_hooks() -> dict:
        return {key: hook for key, hook in torch_optimizer._global_optimizer_post_hooks.items()
                if getattr(hook, "__self__", None) is not OPTIMIZER_STEPS}

    from transformers.models.mistral import modeling_mistral

    hooks_before, library_rotary = others_hooks(), modeling_mistral.apply_rotary_pos_emb
    seen = train_in_process(tiny_model, tmp_path / "runs", monkeypatch, "--quantization", "nf4")
    during = seen["during"]
    assert during["module attributes"] and "forward" in during["module attributes"]  # the fused layers, norms
    assert during["rotary replaced"] and during["optimizer step hooks"] == 1
    assert during["trainer methods"] == ["floating_point_ops"]  # one process: no balanced batches
    assert seen["after"] == {"module attributes": [], "rotary replaced": False, "optimizer step hooks": 0,
                             "trainer methods": []}
    assert others_hooks() == hooks_before  # nobody else's hooks touched
    assert modeling_mistral.apply_rotary_pos_emb is library_rotary
    model = seen["model"]
    norms = [module for module in model.modules() if type(module).__name__.endswith("RMSNorm")]
    lora_layers = [module for module in model.modules() if isinstance(module, LoraLinear4bit)]
    assert len(norms) == 5 and len(lora_layers) == 14
    assert all(module.forward.__func__ is type(module).forward for module in norms + lora_layers)  # their own


def test_the_stock_path_installs_nothing_and_needs_no_checked_versions(tmp_path, tiny_model, topics_home, monkeypatch):
    from qexpand.accel import checked_versions

    monkeypatch.setattr(checked_versions, "installed_version", lambda library: "0.0.1")  # nothing checked
    seen = train_in_process(tiny_model, tmp_path / "runs", monkeypatch, "--quantization", "nf4", "--stock")
    assert seen["during"] == {"module attributes": [], "rotary replaced": False, "optimizer step hooks": 0,
                              "trainer methods": []}
    assert (tmp_path / "runs").is_dir()


def test_training_refuses_unchecked_versions_before_loading_or_writing_anything(tmp_path, tiny_model, topics_home,
                                                                                 monkeypatch):
    import training
    from qexpand import modeling
    from qexpand.accel import checked_versions
    from qexpand.errors import UserError

    monkeypatch.setattr(checked_versions, "installed_version", lambda library: "0.0.1")
    monkeypatch.setattr(modeling, "load_base_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    config = training.parse_config(["--model", str(tiny_model), *TINY_RUN, "--output-dir", str(tmp_path / "runs")])
    with pytest.raises(UserError, match="checked only on .*training.py --stock"):
        training.main(config)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("library", ["torch", "transformers", "peft", "bitsandbytes"])
def test_the_fused_layers_refuse_a_library_version_they_were_not_checked_on(tiny_model, monkeypatch, library):
    from qexpand.accel import checked_versions
    from qexpand.accel.lora_kernels import fused_training
    from qexpand.errors import UserError

    installed = checked_versions.installed_version
    monkeypatch.setattr(checked_versions, "installed_version",
                        lambda name: "99.0.0" if name == library else installed(name))
    with pytest.raises(UserError, match=f"{library} 99.0.0.*training.py --stock"):
        with fused_training(SimpleNamespace(), keep_weights_for_backward=False):
            pass


def test_the_trainer_hooks_and_the_graphed_decoder_refuse_unchecked_versions(monkeypatch):
    import testing_finetuned_model
    from qexpand.accel import checked_versions
    from qexpand.accel.batches import balanced_batches
    from qexpand.accel.graphed_decoding import graphed_greedy_decoding
    from qexpand.errors import UserError

    monkeypatch.setattr(checked_versions, "installed_version", lambda library: "1.0.0")
    two_processes = SimpleNamespace(args=SimpleNamespace(world_size=2))
    with pytest.raises(UserError, match="accelerate 1.0.0.*training.py --stock"):
        with balanced_batches(two_processes, None):
            pass
    with pytest.raises(UserError, match="transformers 1.0.0.*testing_finetuned_model.py --stock"):
        with graphed_greedy_decoding():
            pass
    # The test script asks for the graphed decoder on CUDA only, and never with --stock.
    with testing_finetuned_model.greedy_decoding(SimpleNamespace(stock=True, device="cuda")) as decoder:
        assert decoder is None
    with pytest.raises(UserError, match="--stock"):
        with testing_finetuned_model.greedy_decoding(SimpleNamespace(stock=False, device="cuda")):
            pass


def test_checked_versions_match_the_installed_and_pinned_ones():
    from pathlib import Path

    from qexpand.accel import checked_versions

    pinned = dict(line.split("==") for line in (Path(__file__).parent.parent / "requirements.txt").read_text().split()
                  if "==" in line)
    for library in ("transformers", "peft", "bitsandbytes", "accelerate", "ir_datasets"):
        assert checked_versions.checked(library, pinned[library]), library
    # Every library used privately, in the speed machinery or outside it, has its checked versions listed.
    used = {use.library for uses in checked_versions.PRIVATE_APIS.values() for use in uses}
    assert used <= set(checked_versions.CHECKED_ON) and "loading" in checked_versions.PRIVATE_APIS
    for library in checked_versions.CHECKED_ON:
        assert checked_versions.checked(library, checked_versions.installed_version(library)), library
    assert checked_versions.checked("torch", "2.11.0+cu128") and not checked_versions.checked("torch", "2.12.0")
    assert checked_versions.checked("peft", "0.21.0") and not checked_versions.checked("peft", "0.22.0")
    assert not checked_versions.checked("transformers", "5.17.1")
