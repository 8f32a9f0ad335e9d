"""The loss at labelled positions (qexpand.accel.labelled_loss) is the stock Trainer's loss: same value,
same LoRA gradients, through the Trainer's own compute_loss, with gradient accumulation's token count,
chunked or not, with an output layer that has LoRA and with Gemma's logit softcapping."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tests.fixtures import trainable_lora


def tiny_gemma3(softcap: float):
    """A random 2-layer Gemma 3 text model whose logits are softcapped (Gemma 2 ships 30.0)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              final_logit_softcapping=softcap)
    return Gemma3ForCausalLM(config)


def lora_model(folder, targets: str = "all-linear", softcap: float | None = None, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = tiny_gemma3(softcap) if softcap else AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    torch.manual_seed(0)
    modules = ["q_proj", "v_proj", "lm_head"] if targets == "with-head" else "all-linear"
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=modules,
                                             task_type="CAUSAL_LM"))
    return trainable_lora(model)


def masked_batch():
    """Three examples: a prompt (label -100), a target, right padding (label -100), as training.py collates."""
    ids = torch.randint(3, 500, (3, 12), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    labels = ids.clone()
    for row, (prompt, length) in enumerate([(4, 12), (6, 9), (3, 7)]):
        labels[row, :prompt] = -100
        labels[row, length:] = -100
        attention[row, length:] = 0
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def trainer_for(model, tmp_path, accumulation: int = 1, bf16: bool = False):
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to="none", bf16=bf16,
                                  gradient_accumulation_steps=accumulation, per_device_train_batch_size=3)
    return Trainer(model=model, args=arguments)


def loss_and_grads(trainer, model, num_items):
    loss = trainer.compute_loss(model, masked_batch(), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("targets,chunk,num_items,softcap", [
    ("all-linear", 1024, None, None),    # an eval batch: the mean over its own scored tokens
    ("all-linear", 5, 40, None),         # chunks of 5 positions; a step of several micro-batches (40 tokens)
    ("with-head", 4, 40, None),          # LoRA on the output layer (the original recipe)
    ("all-linear", 7, 40, 2.0)])         # Gemma, softcapped logits
def test_the_labelled_loss_is_the_stock_loss_with_the_stock_gradients(tiny_model, tmp_path, targets, chunk,
                                                                      num_items, softcap):
    from qexpand.accel.labelled_loss import loss_at_labelled_positions

    model = lora_model(tiny_model, targets, softcap)
    trainer = trainer_for(model, tmp_path)
    stock_loss, stock_grads = loss_and_grads(trainer, model, num_items)
    with loss_at_labelled_positions(trainer, model, chunk=chunk):
        loss, grads = loss_and_grads(trainer, model, num_items)
        hidden = model(input_ids=masked_batch()["input_ids"]).logits
        assert hidden.shape[-1] == model.config.hidden_size  # no logits made by the model itself
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(stock_grads) and any("lora_B" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    # On leaving, everything is stock again.
    assert trainer.compute_loss_func is None and "forward" not in vars(model.get_output_embeddings())
    assert model(input_ids=masked_batch()["input_ids"]).logits.shape[-1] == model.config.vocab_size
    assert getattr(model.config, "final_logit_softcapping", None) == softcap


def test_in_mixed_precision_the_labelled_loss_is_the_stock_loss(tiny_model, tmp_path):
    """bf16 weights with the model's forward inside accelerate's autocast, which hands its outputs back in
    float32, as the Trainer runs it (training.py's --precision bf16, the CUDA default)."""
    from qexpand.accel.labelled_loss import loss_at_labelled_positions

    model = lora_model(tiny_model, dtype=torch.bfloat16)
    trainer = trainer_for(model, tmp_path, bf16=True)
    wrapped = trainer.accelerator.prepare_model(model)
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert wrapped(input_ids=masked_batch()["input_ids"]).logits.dtype == torch.float32  # autocast, then float32
    stock_loss, stock_grads = loss_and_grads(trainer, wrapped, 40)
    with loss_at_labelled_positions(trainer, model, chunk=5):
        loss, grads = loss_and_grads(trainer, wrapped, 40)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-2, atol=1e-5, msg=name)


def test_only_the_labelled_positions_go_through_the_output_layer(tiny_model, tmp_path):
    from qexpand.accel.labelled_loss import loss_at_labelled_positions

    model = lora_model(tiny_model)
    trainer = trainer_for(model, tmp_path)
    head = model.get_output_embeddings()
    rows, stock_forward = [], head.forward

    def counted(states):
        rows.append(states.shape[0])
        return stock_forward(states)

    head.forward = counted
    with loss_at_labelled_positions(trainer, model, chunk=6):
        trainer.compute_loss(model, masked_batch()).backward()
    assert head.forward is counted  # a forward of the instance's own is given back as it was
    scored = int((masked_batch()["labels"][:, 1:] != -100).sum())  # 8 + 3 + 4 = 15 of 33 positions
    # Each chunk once forward and once again in the backward pass (recomputed, not kept).
    assert scored == 15 and rows == [6, 6, 3, 3, 6, 6]


def test_a_batch_with_nothing_to_score_gives_zero_and_zero_gradients(tiny_model, tmp_path):
    from qexpand.accel.labelled_loss import loss_at_labelled_positions

    model = lora_model(tiny_model)
    trainer = trainer_for(model, tmp_path)
    batch = masked_batch()
    batch["labels"][:] = -100
    with loss_at_labelled_positions(trainer, model):
        loss = trainer.compute_loss(model, batch, num_items_in_batch=10)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_it_refuses_a_trainer_with_a_loss_of_its_own_and_unchecked_versions(tiny_model, monkeypatch):
    from qexpand.accel import checked_versions
    from qexpand.accel.labelled_loss import loss_at_labelled_positions
    from qexpand.errors import UserError

    model = lora_model(tiny_model)
    with pytest.raises(RuntimeError, match="another one"):
        with loss_at_labelled_positions(SimpleNamespace(compute_loss_func=print, label_smoother=None), model):
            pass
    assert "forward" not in vars(model.get_output_embeddings())
    monkeypatch.setattr(checked_versions, "installed_version", lambda library: "1.0.0")
    with pytest.raises(UserError, match="transformers 1.0.0.*training.py --stock"):
        with loss_at_labelled_positions(SimpleNamespace(compute_loss_func=None, label_smoother=None), model):
            pass


def test_the_chunk_bench_times_the_real_loss_and_checks_it_first(tmp_path):
    from bench.labelled_loss_chunks import main

    out = tmp_path / "chunks.json"
    report = main(["--heads", "smollm2-135m", "--batch", "2", "--positions", "12", "--chunks", "17", "19",
                   "--repeats", "1", "--device", "cpu", "--out", str(out)])
    head = report["heads"]["smollm2-135m"]
    assert head["loss_difference_to_stock"] < 1e-4  # the chunked loss, measured, is the stock loss
    assert head["rows"]["2^17"]["positions_per_chunk"] == 2 and head["rows"]["2^19"]["positions_per_chunk"] == 10
    assert set(head["rows"]) == {"stock", "2^17", "2^19"} and all(r["ms"] > 0 for r in head["rows"].values())
    assert json.loads(out.read_text()) == report


def test_the_default_chunk_is_larger_on_a_gpu_and_never_empty():
    from qexpand.accel.labelled_loss import default_chunk

    assert default_chunk("cuda", 262_144) == 256 and default_chunk("cpu", 262_144) == 64  # Gemma 3's vocabulary
    assert default_chunk("xpu", 32_000) == default_chunk("cuda", 32_000) == 2_097
    assert default_chunk("cpu", 2**30) == 1
