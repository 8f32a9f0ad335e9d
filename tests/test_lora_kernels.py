"""The fused LoRA-on-NF4 layer computes what peft's layer computes: the same loss and the same LoRA
gradients on a tiny 4-bit Mistral in float32, with dropout and with recomputation, in fewer operators."""

from __future__ import annotations

import pytest


def four_bit_lora_model(folder, dropout: float):
    """The tiny model, 4-bit, with float32 compute so that the two paths can be compared closely."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32,
                                                 device_map="cpu")
    model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; non-zero values make every path count
            torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    return model


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


@pytest.mark.parametrize("dropout,checkpointing,reentrant", [(0.0, False, False), (0.1, False, False),
                                                              (0.1, True, False), (0.1, True, True)])
def test_fused_layers_give_peft_loss_and_gradients(tiny_model, dropout, checkpointing, reentrant):
    """The reference is peft's layers with the recomputation training.py used before (not re-entrant)."""
    from qexpand.lora_kernels import fuse_lora_layers

    model = four_bit_lora_model(tiny_model, dropout)
    reference_loss, reference = loss_and_lora_grads(model, checkpointing)
    assert fuse_lora_layers(model) == 14  # 7 projections in each of the 2 blocks
    loss, grads = loss_and_lora_grads(model, checkpointing, reentrant=reentrant)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    assert grads.keys() == reference.keys() and len(grads) == 28
    for name, grad in grads.items():
        scale = reference[name].abs().max().item()
        assert scale > 0 and (grad - reference[name]).abs().max().item() <= 1e-5 * scale, name


def test_fused_layers_launch_fewer_operators_in_a_training_step(tiny_model):
    from torch.profiler import profile

    from bench.lora_kernels_cpu import four_bit_model, launching_operators
    from qexpand.lora_kernels import fuse_lora_layers

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


def test_the_block_scales_are_dequantized_once_not_at_every_step(tiny_model):
    from torch.profiler import profile

    from qexpand.lora_kernels import fuse_lora_layers

    def scale_dequantizations(model) -> int:
        with profile() as prof:
            loss_and_lora_grads(model, checkpointing=True)
        return sum(e.count for e in prof.key_averages() if e.key == "bitsandbytes::dequantize_blockwise")

    model = four_bit_lora_model(tiny_model, 0.1)  # double quantization: 8-bit block scales
    assert scale_dequantizations(model) == 14 * 3  # peft: forward, recomputation, backward of each layer
    fuse_lora_layers(model)
    assert scale_dequantizations(model) == 0


def test_a_training_step_after_an_eval_pass_is_peft_s(tiny_model):
    """On the CPU bitsandbytes repacks 4-bit weights in an eval pass; the next training steps must not
    read them as if they were not."""
    import torch

    from qexpand.lora_kernels import fuse_lora_layers

    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(3))
    fused, plain = (four_bit_lora_model(tiny_model, 0.0) for _ in range(2))
    fuse_lora_layers(fused)
    for model in (fused, plain):
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
    (loss, grads), (reference_loss, reference) = (loss_and_lora_grads(m, checkpointing=False) for m in (fused, plain))
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in grads.items():
        assert (grad - reference[name]).abs().max().item() <= 1e-5 * reference[name].abs().max().item(), name


def test_outside_training_and_with_the_adapter_off_the_layers_are_peft_s(tiny_model):
    import torch

    from qexpand.lora_kernels import fuse_lora_layers

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

    from qexpand.lora_kernels import fuse_lora_layers
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


def test_the_cpu_bench_averages_each_variant_and_compares_it_with_the_old_default():
    from bench.lora_kernels_cpu import VARIANTS, summarise

    runs = [{"layers": layers, "reentrant": reentrant, "launching_operators_per_step": 100 if layers == "peft" else 70,
             "step_ms": step_ms} for (layers, reentrant), step_ms in zip(VARIANTS + VARIANTS[::-1],
                                                                        (400, 300, 350, 250, 270, 370, 320, 420))]
    summary = summarise(runs)
    assert summary["peft, non-re-entrant"] == {"launching_operators_per_step": 100, "step_ms": 410,
                                               "step_ms_over_first": 1.0, "operators_over_first": 1.0}
    assert summary["fused, re-entrant"]["step_ms"] == 260 and summary["fused, re-entrant"]["step_ms_over_first"] == 0.634
    assert summary["fused, non-re-entrant"]["operators_over_first"] == 0.7


def test_the_lora_weights_are_cast_once_per_optimizer_step(tiny_model):
    """Under bf16 autocast the float32 LoRA weights are cast for the products; the cast is reused until
    the optimizer (or anything else) writes to a weight, and then made again from the new values."""
    import torch

    from qexpand.lora_kernels import cast_lora_weights, fuse_lora_layers

    model = four_bit_lora_model(tiny_model, 0.0)
    fuse_lora_layers(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    first = cast_lora_weights(layer, a, b, torch.bfloat16)
    assert first[0].dtype == torch.bfloat16 and torch.equal(first[0], a.detach().to(torch.bfloat16))
    assert all(again is cached for again, cached in zip(cast_lora_weights(layer, a, b, torch.bfloat16), first))
    optimizer = torch.optim.AdamW([a, b], lr=0.1, fused=True)  # CUDA's optimizer in training.py
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    optimizer.step()
    after = cast_lora_weights(layer, a, b, torch.bfloat16)
    assert torch.equal(after[0], a.detach().to(torch.bfloat16)) and torch.equal(after[1], b.detach().to(torch.bfloat16))
    assert not torch.equal(after[0], first[0])


def test_fused_layers_follow_peft_over_optimizer_steps_under_autocast(tiny_model):
    """Three steps of the fused AdamW training.py uses on CUDA (it leaves the weights' version counters
    alone) under bf16 autocast: a cast kept past a step would train on the first weights throughout."""
    import torch

    from qexpand.lora_kernels import fuse_lora_layers

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

    from qexpand.lora_kernels import fuse_lora_layers, fuse_rms_norms

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

    from qexpand.lora_kernels import fuse_rms_norms

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

    from qexpand.lora_kernels import fuse_rms_norms

    class OnePlusWeightRMSNorm(MistralRMSNorm):
        def forward(self, hidden):
            variance = hidden.float().pow(2).mean(-1, keepdim=True)
            return (1 + self.weight) * (hidden.float() * torch.rsqrt(variance + self.variance_epsilon))

    model = torch.nn.ModuleList([MistralRMSNorm(64), OnePlusWeightRMSNorm(64), GemmaRMSNorm(64)])
    assert fuse_rms_norms(model) == 1
    assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__ and "forward" not in model[2].__dict__
