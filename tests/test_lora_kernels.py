"""The fused LoRA-on-NF4 layer computes what peft's layer computes: the same loss and the same LoRA
gradients on a tiny 4-bit Mistral in float32, with dropout and with recomputation, in fewer operators."""

from __future__ import annotations

import pytest

from tests.fixtures import trainable_lora


# Operators that launch no kernel of their own on a GPU (views, allocations, no-op casts).
NO_KERNEL = ("aten::view", "aten::as_strided", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::t",
             "aten::transpose", "aten::detach", "aten::_unsafe_view", "aten::reshape", "aten::slice", "aten::expand",
             "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::permute", "aten::select", "aten::to",
             "aten::resolve_conj", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::lift_fresh",
             "aten::item", "aten::_local_scalar_dense", "aten::result_type", "aten::contiguous")


def launching_operators(prof) -> int:
    """Innermost aten operators of a profile that do work (would launch a kernel on a GPU)."""
    return sum(1 for event in prof.events()
               if event.name.startswith("aten::") and not event.cpu_children and event.name not in NO_KERNEL)


def four_bit_model(folder):
    """The base and LoRA layers as training.py builds them on CUDA (4-bit NF4, bf16 compute, LoRA r=8
    with dropout 0.05 on the 7 projections), here on the CPU; the caller turns recomputation on."""
    from peft import get_peft_model

    from qexpand import modeling

    model = modeling.load_base_model(str(folder), None, "nf4", "cpu", "bf16")
    model.enable_input_require_grads()
    model = get_peft_model(model, modeling.lora_config(model, 8, 16, 0.05, "all-linear"))
    model.train()
    return model


def four_bit_lora_model(folder, dropout: float, keep_layout: bool = True):
    """The tiny model, 4-bit, with float32 compute so that the two paths can be compared closely; its
    4-bit weights kept in the layout that trains, as training.py keeps them (`keep_layout`; without it,
    as bitsandbytes leaves them: repacked for its CPU inference kernel by an eval pass on a CPU with
    AVX512-BF16)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qexpand.modeling import keep_four_bit_layout_for_training

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32,
                                                 device_map="cpu")
    if keep_layout:
        keep_four_bit_layout_for_training(model)
    model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    return trainable_lora(model)


def loss_and_lora_grads(model, checkpointing: bool, autocast: bool = False, reentrant: bool = False):
    import torch

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(3, 500, (3, 11), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("dropout,checkpointing,reentrant,grouped,keep", [
    (0.0, False, False, True, False), (0.1, False, False, False, False), (0.1, True, False, False, False),
    (0.1, True, True, False, False), (0.0, True, True, True, True), (0.1, True, True, False, True)])
def test_fused_layers_give_peft_loss_and_gradients(tiny_model, dropout, checkpointing, reentrant, grouped, keep):
    """The reference is peft's layers with the recomputation training.py used before (not re-entrant).
    Siblings in one call share a dropout mask where peft draws one per layer: they are compared with
    peft without dropout here, and with dropout against the layers one call each (next test)."""
    from qexpand.accel.lora_kernels import fuse_lora_layers

    model = four_bit_lora_model(tiny_model, dropout)
    reference_loss, reference = loss_and_lora_grads(model, checkpointing)
    routed = fuse_lora_layers(model, group_siblings=grouped, keep_weights_for_backward=keep)
    assert routed == 14  # 7 projections in each of the 2 blocks
    loss, grads = loss_and_lora_grads(model, checkpointing, reentrant=reentrant)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    assert grads.keys() == reference.keys() and len(grads) == 28
    for name, grad in grads.items():
        scale = reference[name].abs().max().item()
        assert scale > 0 and (grad - reference[name]).abs().max().item() <= 1e-5 * scale, name


def test_fused_layers_launch_fewer_operators_in_a_training_step(tiny_model):
    from torch.profiler import profile

    from qexpand.accel.lora_kernels import fuse_lora_layers

    def launched(model) -> int:
        """In one training step as training.py runs it on CUDA (bf16 compute, autocast, LoRA weights
        in float32, re-entrant recomputation)."""
        with profile() as prof:
            loss_and_lora_grads(model, checkpointing=True, autocast=True, reentrant=True)
        return launching_operators(prof)

    model = four_bit_model(tiny_model)  # as training.py builds it
    before = launched(model)
    fuse_lora_layers(model)
    assert launched(model) < 0.85 * before


def test_grouped_siblings_compute_what_the_layers_compute_one_by_one_with_one_dropout_mask(tiny_model, monkeypatch):
    """With dropout drawn as a function of the input alone (so that every layer on the same input gets
    the same mask, as grouped siblings share one), grouping changes neither the loss nor a gradient,
    with re-entrant recomputation and the weights kept for the backward pass."""
    import torch

    from qexpand.accel.lora_kernels import fuse_lora_layers

    def dropout_of_the_input(x, p, train):
        mask = torch.sin(x * 1000.0) > 2 * p - 1  # about 1 - p kept, the same mask for the same input
        return x * mask / (1 - p), mask

    monkeypatch.setattr(torch, "native_dropout", dropout_of_the_input)
    seen = []
    for grouped in (False, True):
        model = four_bit_lora_model(tiny_model, 0.1)
        fuse_lora_layers(model, group_siblings=grouped, keep_weights_for_backward=grouped)
        seen.append(loss_and_lora_grads(model, checkpointing=True, reentrant=True))
    (loss, grads), (reference_loss, reference) = seen[1], seen[0]
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in grads.items():
        scale = reference[name].abs().max().item()
        assert scale > 0 and (grad - reference[name]).abs().max().item() <= 1e-5 * scale, name


def test_sibling_layers_run_as_one_call_and_keep_their_weights_for_the_backward_pass(tiny_model):
    """q/k/v and gate/up of each block: one autograd call per group and pass, not one per layer. With
    re-entrant recomputation the weights de-quantized in the recomputation serve the backward pass:
    two de-quantizations of each weight a step (the first pass and the recomputation), not three."""
    from torch.profiler import profile

    from qexpand.accel.lora_kernels import fuse_lora_layers

    def step(model) -> dict:
        loss_and_lora_grads(model, checkpointing=True, autocast=True, reentrant=True)  # casts made
        with profile() as prof:
            loss_and_lora_grads(model, checkpointing=True, autocast=True, reentrant=True)
        counts = {e.key: e.count for e in prof.key_averages()}
        return {"calls": counts["LoraOnNF4"], "dequantized": counts["bitsandbytes::dequantize_4bit"],
                "launched": launching_operators(prof)}

    seen = {}
    for grouped, keep in ((False, False), (True, False), (True, True)):
        model = four_bit_model(tiny_model)
        fuse_lora_layers(model, group_siblings=grouped, keep_weights_for_backward=keep)
        seen[grouped, keep] = step(model)
    # 2 blocks x 2 passes: 7 calls a block alone, 4 grouped (q/k/v, o, gate/up, down)
    assert seen[False, False]["calls"] == 28 and seen[True, False]["calls"] == 16
    assert seen[False, False]["dequantized"] == seen[True, False]["dequantized"] == 14 * 3
    assert seen[True, True]["dequantized"] == 14 * 2
    # (bitsandbytes' de-quantization is one CUDA kernel, but no aten operator on the CPU)
    assert seen[True, True]["launched"] <= seen[True, False]["launched"] < 0.9 * seen[False, False]["launched"]


def test_a_sibling_called_on_another_input_computes_its_own_output(tiny_model):
    """The leader (q_proj) keeps k's and v's outputs for its own input only; a sibling called on
    anything else gets what it would have computed alone, and the kept outputs go once taken."""
    import torch

    from qexpand.accel.lora_kernels import fuse_lora_layers

    grouped, alone = (four_bit_lora_model(tiny_model, 0.0) for _ in range(2))
    fuse_lora_layers(grouped)
    fuse_lora_layers(alone, group_siblings=False)
    first, other = (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    attention, reference = (m.base_model.model.model.layers[0].self_attn for m in (grouped, alone))
    group = attention.q_proj.sibling_group
    assert group.members == (attention.q_proj, attention.k_proj, attention.v_proj)

    def same(a, b):  # the stacked A product rounds differently from one layer's own, in float32
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        assert same(attention.q_proj(first), reference.q_proj(first))
        assert group.pending[0] is first and len(group.pending[1]) == 2
        assert same(attention.k_proj(other), reference.k_proj(other))  # not q's input: computed
        assert same(attention.v_proj(first), reference.v_proj(first))  # q's input: taken
        assert same(attention.k_proj(first), reference.k_proj(first))
        assert group.pending is None


def test_the_block_scales_are_dequantized_once_not_at_every_step(tiny_model):
    from torch.profiler import profile

    from qexpand.accel.lora_kernels import fuse_lora_layers

    def scale_dequantizations(model) -> int:
        with profile() as prof:
            loss_and_lora_grads(model, checkpointing=True)
        return sum(e.count for e in prof.key_averages() if e.key == "bitsandbytes::dequantize_blockwise")

    model = four_bit_lora_model(tiny_model, 0.1)  # double quantization: 8-bit block scales
    assert scale_dequantizations(model) == 14 * 3  # peft: forward, recomputation, backward of each layer
    fuse_lora_layers(model)
    assert scale_dequantizations(model) == 0


def test_the_fused_layers_hand_bitsandbytes_plain_tensors(tiny_model, monkeypatch):
    """bitsandbytes' 4-bit parameter class runs Python for every operator it takes part in."""
    from bitsandbytes.nn import Params4bit

    from qexpand.accel.lora_kernels import fuse_lora_layers

    model = four_bit_lora_model(tiny_model, 0.1)
    seen, handler = [], Params4bit.__torch_function__.__func__

    def operators_seen(cls, func, *args, **kwargs):
        if getattr(func, "__name__", "") != "__get__":  # attribute reads (the test's own p.grad) aside
            seen.append(func)
        return handler(cls, func, *args, **kwargs)

    monkeypatch.setattr(Params4bit, "__torch_function__", classmethod(operators_seen))
    loss_and_lora_grads(model, checkpointing=True)
    assert seen  # peft's layers de-quantize the parameter itself
    fuse_lora_layers(model)
    seen.clear()
    loss_and_lora_grads(model, checkpointing=True)
    assert seen == []


def requires_avx512_bf16():
    """Skip, saying so, where bitsandbytes finds no AVX512-BF16 on this CPU: it repacks 4-bit weights in
    an eval pass only where it does (`Linear4bit.support_avx512bf16_for_cpu`, from this same check)."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16 (bitsandbytes.functional.has_avx512bf16() is False), so "
                    "bitsandbytes never repacks 4-bit weights here: the guard against the repacking "
                    "(modeling.keep_four_bit_layout_for_training) is untested on this machine")


def eval_pass_then_training(model, ids):
    """An eval pass (as the Trainer's), then the model back in training mode; its 4-bit quant states."""
    import torch
    from bitsandbytes.nn import Linear4bit

    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    return [m.weight.quant_state for m in model.modules() if isinstance(m, Linear4bit)]


def test_on_a_cpu_with_avx512_bf16_an_eval_pass_repacks_unguarded_weights_and_training_loses_gradients(tiny_model):
    """What the guard prevents, shown on a model without it: the eval pass repacks every 4-bit weight,
    the next training step runs bitsandbytes' gemv_4bit, which has no gradient formula, and the
    gradients of the LoRA weights before the last repacked layer are lost (with only a warning)."""
    import torch

    requires_avx512_bf16()
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(3))
    unguarded, guarded = four_bit_lora_model(tiny_model, 0.0, keep_layout=False), four_bit_lora_model(tiny_model, 0.0)
    states = eval_pass_then_training(unguarded, ids)
    assert len(states) == 14 and all(getattr(s, "packing_format_for_cpu", False) for s in states)
    with pytest.warns(UserWarning, match="gemv_4bit: an autograd kernel was not registered"):
        _, lost = loss_and_lora_grads(unguarded, checkpointing=False)
    _, reference = loss_and_lora_grads(guarded, checkpointing=False)
    wrong = [name for name, grad in lost.items()
             if (grad - reference[name]).abs().max().item() > 1e-3 * reference[name].abs().max().item()]
    assert len(wrong) >= 14, wrong  # at least half of the 28 LoRA gradients


def test_a_training_step_after_an_eval_pass_is_peft_s(tiny_model):
    """On a CPU with AVX512-BF16 bitsandbytes would repack 4-bit weights in an eval pass for a kernel
    without a gradient formula (previous test; pytest.ini makes a backward pass through one an error);
    the weights of a model that trains stay as they are, and the next training step is the step of a
    model that had no eval pass, through the fused layers as through peft's."""
    import torch

    from qexpand.accel.lora_kernels import fuse_lora_layers
    from qexpand.modeling import keep_four_bit_layout_for_training

    requires_avx512_bf16()
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(3))
    fused, plain, fresh = (four_bit_lora_model(tiny_model, 0.0) for _ in range(3))
    assert keep_four_bit_layout_for_training(four_bit_lora_model(tiny_model, 0.0, keep_layout=False)) == 14
    assert keep_four_bit_layout_for_training(fresh) == 0  # guarded already: no layer would repack
    fuse_lora_layers(fused)
    for model in (fused, plain):
        states = eval_pass_then_training(model, ids)
        assert len(states) == 14 and not any(getattr(s, "packing_format_for_cpu", False) for s in states)
    reference_loss, reference = loss_and_lora_grads(fresh, checkpointing=False)
    assert len(reference) == 28 and all(grad.abs().max().item() > 0 for grad in reference.values())
    for loss, grads in (loss_and_lora_grads(m, checkpointing=False) for m in (fused, plain)):
        assert loss == pytest.approx(reference_loss, rel=1e-6)
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            assert (grad - reference[name]).abs().max().item() <= 1e-5 * reference[name].abs().max().item(), name


def test_outside_training_and_with_the_adapter_off_the_layers_are_peft_s(tiny_model):
    import torch

    from qexpand.accel.lora_kernels import fuse_lora_layers

    ids = torch.randint(3, 500, (1, 5), generator=torch.Generator().manual_seed(2))
    fused, plain = (four_bit_lora_model(tiny_model, 0.1) for _ in range(2))
    fuse_lora_layers(fused)
    with torch.no_grad():
        with fused.disable_adapter(), plain.disable_adapter():
            assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)  # the base alone
        fused.eval(), plain.eval()
        assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)  # eval passes


def test_compiled_blocks_trace_the_fused_layers_whole(tiny_model):
    from torch._dynamo.utils import counters

    from qexpand.accel.lora_kernels import fuse_lora_layers
    from qexpand.modeling import compile_decoder_layers

    # Dropout 0: compiled code draws its dropout masks from another generator than eager code does.
    model = four_bit_lora_model(tiny_model, 0.0)
    reference_loss, reference = loss_and_lora_grads(model, checkpointing=True)
    counters.clear()
    fuse_lora_layers(model)
    compile_decoder_layers(model)
    loss, grads = loss_and_lora_grads(model, checkpointing=True)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # one graph, both blocks
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in grads.items():
        assert (grad - reference[name]).abs().max().item() <= 1e-5 * reference[name].abs().max().item(), name


def test_the_lora_weights_are_cast_once_per_optimizer_step(tiny_model):
    """Under bf16 autocast the float32 LoRA weights are cast for the products (a group's A matrices
    stacked into one); the cast is reused until the optimizer (or anything else) writes to a
    weight, and then made again from the new values."""
    import torch

    from qexpand.accel.lora_kernels import cast_lora_weights, fuse_lora_layers

    model = four_bit_lora_model(tiny_model, 0.0)
    fuse_lora_layers(model)
    attention = model.base_model.model.model.layers[0].self_attn
    group = attention.q_proj.sibling_group
    assert [layer for layer in group.members] == [attention.q_proj, attention.k_proj, attention.v_proj]
    a_s = [layer.lora_A["default"].weight for layer in group.members]
    b_s = [layer.lora_B["default"].weight for layer in group.members]

    def cast(weights):
        return [w.detach().to(torch.bfloat16) for w in weights]

    def as_expected(casts) -> bool:
        return torch.equal(casts[0], torch.cat(cast(a_s))) and all(map(torch.equal, casts[1], cast(b_s)))

    first = cast_lora_weights(group, a_s, b_s, torch.bfloat16)
    assert first[0].dtype == torch.bfloat16 and as_expected(first)
    assert cast_lora_weights(group, a_s, b_s, torch.bfloat16) is first
    optimizer = torch.optim.AdamW([*a_s, *b_s], lr=0.1, fused=True)  # CUDA's optimizer in training.py
    for weight in (*a_s, *b_s):
        weight.grad = torch.ones_like(weight)
    optimizer.step()
    after = cast_lora_weights(group, a_s, b_s, torch.bfloat16)
    assert as_expected(after) and not torch.equal(after[0], first[0])


def test_fused_layers_follow_peft_over_optimizer_steps_under_autocast(tiny_model):
    """Three steps of the fused AdamW training.py uses on CUDA (it leaves the weights' version counters
    alone) under bf16 autocast: a cast kept past a step would train on the first weights throughout."""
    import torch

    from qexpand.accel.lora_kernels import fuse_lora_layers

    def losses(model) -> list[float]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, fused=True)
        ids = torch.randint(3, 500, (3, 11), generator=torch.Generator().manual_seed(1))
        seen = []
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            seen.append(loss.item())
            optimizer.step()
            model.zero_grad(set_to_none=True)
        return seen

    fused, plain = (four_bit_lora_model(tiny_model, 0.0) for _ in range(2))
    fuse_lora_layers(fused)
    fused_losses, plain_losses = losses(fused), losses(plain)
    assert plain_losses[2] < plain_losses[0] - 0.2  # the steps change the model
    assert fused_losses == pytest.approx(plain_losses, abs=0.01)  # bf16 rounding apart


def test_fused_rms_norms_give_the_model_s_loss_and_gradients_and_leave_eval_alone(tiny_model):
    import torch

    from qexpand.accel.lora_kernels import fuse_lora_layers, fuse_rms_norms

    model = four_bit_lora_model(tiny_model, 0.0)
    reference_loss, reference = loss_and_lora_grads(model, checkpointing=True, reentrant=True)
    fuse_lora_layers(model)
    assert fuse_rms_norms(model) == 5  # two in each of the 2 blocks, one after the last
    loss, grads = loss_and_lora_grads(model, checkpointing=True, reentrant=True)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in grads.items():
        assert (grad - reference[name]).abs().max().item() <= 1e-5 * reference[name].abs().max().item(), name
    ids = torch.randint(3, 500, (1, 5), generator=torch.Generator().manual_seed(2))
    plain = four_bit_lora_model(tiny_model, 0.0)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)  # the model's own norm


def test_a_fused_rms_norm_in_bf16_differs_from_the_model_s_by_rounding_only():
    import torch
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from qexpand.accel.lora_kernels import fuse_rms_norms

    norm, fused = MistralRMSNorm(256), MistralRMSNorm(256)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 256))
        fused.load_state_dict(norm.state_dict())
    norm, fused = norm.to(torch.bfloat16), fused.to(torch.bfloat16)
    assert fuse_rms_norms(fused) == 1
    hidden = torch.randn(4, 9, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = norm(hidden), fused(hidden)
    assert got.dtype == expected.dtype == torch.bfloat16
    # One bf16 step of the result at most (8 significant bits).
    assert ((got.float() - expected.float()).abs() <= expected.float().abs() * 2 ** -7 + 1e-6).all()


def test_eager_training_attention_leaves_cudnn_out_on_cuda_and_changes_nothing_elsewhere():
    import torch

    from qexpand.modeling import training_attention

    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled())
    for device, compiled in (("cpu", False), ("cuda", True)):  # compiled blocks keep the library's choice
        with training_attention(device, compiled):
            assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]
    with training_attention("cuda", compiled=False):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled()) == before


def test_rms_norms_that_compute_something_else_keep_their_own_forward():
    """Gemma's norm scales by 1 + weight: torch's rms_norm would train another model."""
    import torch
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from qexpand.accel.lora_kernels import fuse_rms_norms

    class OnePlusWeightRMSNorm(MistralRMSNorm):
        def forward(self, hidden):
            variance = hidden.float().pow(2).mean(-1, keepdim=True)
            return (1 + self.weight) * (hidden.float() * torch.rsqrt(variance + self.variance_epsilon))

    model = torch.nn.ModuleList([MistralRMSNorm(64), OnePlusWeightRMSNorm(64), GemmaRMSNorm(64)])
    assert fuse_rms_norms(model) == 1
    assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__ and "forward" not in model[2].__dict__


def rotary_inputs(dtype, head_dim: int = 16):
    """Queries (4 heads) and keys (2 heads) of 2 sequences of 7 tokens, with Mistral's cosine and sine."""
    import torch

    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, head_dim, generator=generator), torch.randn(2, 2, 7, head_dim, generator=generator)
    angles = torch.randn(2, 7, head_dim // 2, generator=generator)
    angles = torch.cat((angles, angles), dim=-1)
    grad_q, grad_k = torch.randn(q.shape, generator=generator), torch.randn(k.shape, generator=generator)
    return [t.to(dtype) for t in (q, k, angles.cos(), angles.sin(), grad_q, grad_k)]


def rotated_with_grads(rotary, q, k, cos, sin, grad_q, grad_k):
    import torch

    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_out, k_out = rotary(q, k, cos, sin)
    torch.autograd.backward((q_out, k_out), (grad_q, grad_k))
    return q_out.detach(), k_out.detach(), q.grad, k.grad


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_the_training_rotary_embedding_rotates_as_the_library_does_and_back_in_its_backward(dtype_name):
    import torch
    from transformers.models.mistral import modeling_mistral

    from qexpand.accel.lora_kernels import rotary_embedding

    library = modeling_mistral.apply_rotary_pos_emb
    inputs = rotary_inputs(getattr(torch, dtype_name))
    theirs = rotated_with_grads(library, *inputs)
    ours = rotated_with_grads(lambda *a: rotary_embedding(*a, library_rotary=library), *inputs)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])  # the same roundings
    exact = rotated_with_grads(library, *[t.double() for t in inputs])  # the gradients in float64
    for mine, library_grad, exact_grad in zip(ours[2:], theirs[2:], exact[2:]):
        if dtype_name == "float32":
            assert torch.allclose(mine, library_grad, atol=1e-6)
        else:  # one rounding where the library's backward rounds each term: no further from the exact value
            assert (mine.double() - exact_grad).abs().max() <= (library_grad.double() - exact_grad).abs().max()


def test_the_training_rotary_embedding_is_in_force_inside_only_and_gives_the_model_s_loss_and_gradients(
        tiny_model, monkeypatch):
    from transformers.models.mistral import modeling_mistral

    from qexpand.accel import lora_kernels
    from qexpand.accel.lora_kernels import fuse_lora_layers, rotary_for_training

    library = modeling_mistral.apply_rotary_pos_emb
    model = four_bit_lora_model(tiny_model, 0.0)
    fuse_lora_layers(model, keep_weights_for_backward=True)
    reference_loss, reference = loss_and_lora_grads(model, checkpointing=True, reentrant=True)
    calls, function = [], lora_kernels.rotary_function
    monkeypatch.setattr(lora_kernels, "rotary_function", lambda: calls.append(1) or function())
    with rotary_for_training(model) as replaced:
        assert replaced == 1 and modeling_mistral.apply_rotary_pos_emb is not library
        assert len(calls) == 1  # the probe compared the library's rotation with this one
        calls.clear()
        loss, grads = loss_and_lora_grads(model, checkpointing=True, reentrant=True)
    assert modeling_mistral.apply_rotary_pos_emb is library  # put back
    assert len(calls) == 2 * 2  # the 2 blocks, in the first pass and the recomputation
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in grads.items():
        assert (grad - reference[name]).abs().max().item() <= 1e-5 * reference[name].abs().max().item(), name


def test_rotary_calls_the_training_function_does_not_handle_go_to_the_library_s_own():
    import torch
    from transformers.models.mistral import modeling_mistral

    from qexpand.accel.lora_kernels import rotary_embedding, rotary_function, rotates_halves

    q, k, cos, sin, _, _ = rotary_inputs(torch.float32)
    library_calls = []

    def library(*args, **kwargs):
        library_calls.append(args[2].shape[-1])
        return modeling_mistral.apply_rotary_pos_emb(*args, **kwargs)

    rotary_function.cache_clear()
    rotary_embedding(q, k, cos, sin, library_rotary=library)
    assert library_calls == [] and rotary_function.cache_info().currsize == 1  # the plain case is ours
    rotary_embedding(q, k, cos[..., :8], sin[..., :8], library_rotary=lambda *a: library_calls.append("part"))
    rotary_embedding(q, k, cos.requires_grad_(), sin, library_rotary=library)  # a cosine that learns
    rotary_embedding(q, k.double(), cos.detach(), sin, library_rotary=library)  # mixed dtypes
    assert library_calls == ["part", 16, 16]

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J's form: pairs (0, 1), (2, 3), ... rotate
        def rotate(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    assert rotates_halves(modeling_mistral.apply_rotary_pos_emb) and not rotates_halves(interleaved)
    assert not rotates_halves(lambda q, k: (q, k))  # another signature


def test_de_quantized_weights_wait_for_the_backward_pass_only_under_re_entrant_recomputation():
    from qexpand.accel.lora_kernels import weights_can_wait_for_backward

    assert weights_can_wait_for_backward(checkpointing=True, reentrant=True)
    # Without recomputation the whole model's weights would wait; non-re-entrant records every block at once.
    assert not weights_can_wait_for_backward(checkpointing=False, reentrant=True)
    assert not weights_can_wait_for_backward(checkpointing=True, reentrant=False)
