"""Training on a 4-bit base with fewer launches: one autograd function per LoRA layer, torch's RMSNorm.

A training step of the default recipe is bound by the host, not the GPU: the GPU runs kernels about
half of an eager step and about half of a compiled one (bench/RESULTS.md). peft's forward of a LoRA
layer on a bitsandbytes NF4 base goes through four modules and one autograd function of Python, and
launches a defensive copy of the base output, a separate scaling and a separate addition. Here the
whole layer is one autograd function: the base product, the dropout, the two LoRA products and the
scaled addition (one addmm), with a hand-written backward. The block scales of each 4-bit weight are
de-quantized once when the layers are fused (double quantization stores them in 8 bits, and
bitsandbytes would de-quantize them again in each of the three de-quantizations of a step: two
launches each). The parameters stay peft's, so the adapter is saved and loaded exactly as before.
Only the plain case is fused (one active adapter, no DoRA, no biases, not merged, in training mode);
every other call goes through peft's own forward. The LoRA weights are cast to the products' dtype
once per optimizer step, and the model's RMSNorms run as torch's single operator while training.
"""

from __future__ import annotations

import functools
import types


def fuse_lora_layers(model) -> int:
    """Route every fusable peft LoRA layer on a bitsandbytes 4-bit base through `lora_on_nf4()`;
    returns how many were routed."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    # The function is looked up here, not in the forward: torch.compile then sees it as a constant.
    forward = functools.partial(fused_forward, function=lora_on_nf4())
    optimizer_steps()  # counting from before the first step
    routed = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit) and fusable(module):
            weight = module.get_base_layer().weight
            # Plain attributes, not buffers: the adapter's state dict stays peft's.
            module.nf4_scales = (weight.quant_state, block_scales(weight.quant_state))
            module.forward = types.MethodType(forward, module)
            routed += 1
    return routed


@functools.cache
def optimizer_steps() -> list[int]:
    """How many optimizer steps any optimizer of this process has taken since the first call (a global
    hook of torch's, installed by that call)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    counter = [0]

    def count(optimizer, args, kwargs):
        counter[0] += 1

    register_optimizer_step_post_hook(count)
    return counter


def fuse_rms_norms(model) -> int:
    """Route every RMSNorm of the model (Mistral's: 2 per block and 1 at the end) through torch's
    `rms_norm` while training; returns how many were routed. The model's own norm is eight operators
    forward and about ten backward, each a launch from Python; torch's is one operator each way, a
    single kernel on CUDA. It rounds once where the model's rounds twice (the normalised values to
    bf16, then their product with the weight), so outputs can differ in the last bit of bf16. A norm
    is routed only if it computes what torch's does on a probe (some models' RMSNorm scales by
    1 + weight, or keeps its epsilon elsewhere): those keep their own."""
    routed = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and computes_plain_rms_norm(module):
            module.forward = types.MethodType(fused_rms_norm_forward, module)
            routed += 1
    return routed


def computes_plain_rms_norm(module) -> bool:
    """Whether the module's forward is weight * x / sqrt(mean(x^2) + variance_epsilon), tried in float32
    on random rows (1 + weight, the other common form, differs from weight whatever the weight)."""
    import torch

    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(eps, float) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False
    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        theirs = type(module).forward(module, probe).float()
        ours = torch.nn.functional.rms_norm(probe, weight.shape, weight.float(), eps)
    return theirs.shape == ours.shape and torch.allclose(theirs, ours, rtol=1e-3, atol=1e-5)


def fused_rms_norm_forward(self, hidden):
    """The forward that `fuse_rms_norms` installs: torch's rms_norm in training mode where input and
    weight share a dtype (the model's own computes the mixed case with type promotion), else the
    model's own forward."""
    import torch

    if not self.training or hidden.dtype != self.weight.dtype:
        return type(self).forward(self, hidden)
    # Outside autocast, which may run norms in float32: the model's norm returns the input's dtype.
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.rms_norm(hidden, self.weight.shape, self.weight, self.variance_epsilon)


def block_scales(state):
    """The float32 scale of every block of a 4-bit weight (stored in 8 bits under double quantization)."""
    from bitsandbytes.functional import dequantize_blockwise

    if not state.nested:
        return state.absmax.float()
    return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def plain_adapter(layer) -> str | None:
    """The layer's one active adapter if it is plain LoRA (no DoRA or other variant, no biases,
    dropout or none), else None. Checked at every call: adapters can be switched after fusing."""
    import torch

    adapters = layer.active_adapters
    if len(adapters) != 1 or adapters[0] not in layer.lora_A or adapters[0] in layer.lora_variant:
        return None
    adapter = adapters[0]
    plain = (layer.lora_A[adapter].bias is None and layer.lora_B[adapter].bias is None
             and isinstance(layer.lora_dropout[adapter], (torch.nn.Dropout, torch.nn.Identity)))
    return adapter if plain else None


def fusable(layer) -> bool:
    """A plain adapter on a 4-bit base layer without bias (the base does not change after fusing)."""
    base = layer.get_base_layer()
    return (plain_adapter(layer) is not None and base.bias is None
            and getattr(base.weight, "quant_state", None) is not None)


def fused_forward(self, x, *args, function=None, **kwargs):
    """The forward that `fuse_lora_layers` installs on a layer (`function` is `lora_on_nf4()`)."""
    import torch

    # Training steps only: eval passes are few. And only while the weight is the one whose scales were
    # de-quantized at fusing: bitsandbytes repacks 4-bit weights for the CPU in place at inference,
    # after which only its own forward reads them.
    adapter = plain_adapter(self)
    base = self.get_base_layer()
    state, scales = self.nf4_scales
    same_weight = base.weight.quant_state is state and not getattr(state, "packing_format_for_cpu", False)
    if (not self.training or args or kwargs or self.disable_adapters or self.merged or adapter is None
            or not same_weight or scales.device != x.device):
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    dropout = self.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0  # Identity when dropout is 0
    device = x.device.type
    # Under autocast peft runs the LoRA products in the autocast dtype; without it, in the LoRA
    # weights' own dtype, casting the result back.
    lora_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                  else self.lora_A[adapter].weight.dtype)
    nf4 = (base.weight, scales, state.blocksize, state.quant_type, state.shape, state.dtype)
    lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    return function.apply(x, nf4, base.compute_dtype or x.dtype, lora_a, lora_b,
                          cast_lora_weights(self, lora_a, lora_b, lora_dtype), float(self.scaling[adapter]), p)


def cast_lora_weights(layer, lora_a, lora_b, dtype):
    """The LoRA weights in the dtype the products run in, cast once per optimizer step, not in every
    forward pass: the weights are float32 and the products bf16 under autocast, and with recomputation
    each weight went through two casts a step, one now (Mistral-7B: 448 launches fewer a step, 11,661
    kernels against 12,109 in a profiled step on an H200, bench/RESULTS.md). A cast stays
    valid while no optimizer step has been taken since (in this process, by any optimizer), neither
    weight has been written to (their version counters; torch's fused AdamW leaves those as they are,
    hence the step count) and neither has moved."""
    import torch

    if lora_a.dtype == dtype and lora_b.dtype == dtype:
        return lora_a.detach(), lora_b.detach()
    if torch.compiler.is_compiling():  # a compiled block fuses the casts into its own kernels
        return lora_a.detach().to(dtype), lora_b.detach().to(dtype)
    key = (dtype, optimizer_steps()[0], lora_a._version, lora_b._version, lora_a.data_ptr(), lora_b.data_ptr())
    cached = layer.__dict__.get("lora_weight_casts")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, lora_a.to(dtype), lora_b.to(dtype))
        layer.__dict__["lora_weight_casts"] = cached  # a plain attribute: not in the state dict
    return cached[1], cached[2]


@functools.cache
def lora_on_nf4():
    """The autograd function, built on first use (importing this module imports neither torch nor
    bitsandbytes)."""
    import torch
    from torch.nn.functional import linear

    def dequantized(nf4, dtype):
        weight, scales, blocksize, quant_type, shape, weight_dtype = nf4
        # bitsandbytes' own operator, with the block scales de-quantized beforehand.
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            weight, scales, blocksize, quant_type, shape, weight_dtype).to(dtype)

    class LoraOnNF4(torch.autograd.Function):
        """y = x W^T + scaling * dropout(x) A^T B^T, W in NF4; the gradients of x, A and B."""

        @staticmethod
        def forward(ctx, x, nf4, compute_dtype, lora_a, lora_b, cast_weights, scaling, p):
            a, b = cast_weights  # lora_a and lora_b in the dtype of the LoRA products
            with torch.autocast(x.device.type, enabled=False):
                base = linear(x.to(compute_dtype), dequantized(nf4, compute_dtype))
                kept = x.to(a.dtype)
                mask = None
                if p > 0:
                    kept, mask = torch.native_dropout(kept, p, True)
                low = linear(kept, a)  # (..., r)
                flat = base.view(-1, base.shape[-1])
                if a.dtype == compute_dtype:
                    flat.addmm_(low.view(-1, low.shape[-1]), b.t(), alpha=scaling)
                else:
                    flat.add_((linear(low, b) * scaling).view(flat.shape).to(compute_dtype))
            ctx.save_for_backward(kept, low, mask, a, b)
            ctx.nf4, ctx.compute_dtype, ctx.scaling, ctx.p = nf4, compute_dtype, scaling, p
            ctx.grad_dtypes, ctx.x_shape = (x.dtype, lora_a.dtype, lora_b.dtype), x.shape
            return base.to(x.dtype)

        @staticmethod
        def backward(ctx, grad):
            kept, low, mask, a, b = ctx.saved_tensors
            x_dtype, a_dtype, b_dtype = ctx.grad_dtypes
            grad = grad.reshape(-1, grad.shape[-1])
            kept, low = kept.reshape(-1, kept.shape[-1]), low.reshape(-1, low.shape[-1])
            scaled = grad.to(a.dtype) * ctx.scaling
            grad_b = (scaled.t() @ low).to(b_dtype)
            grad_low = scaled @ b  # (tokens, r)
            grad_a = (grad_low.t() @ kept).to(a_dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:
                weight = dequantized(ctx.nf4, ctx.compute_dtype)
                grad_kept = grad_low @ a
                if mask is not None:
                    grad_kept = torch.ops.aten.native_dropout_backward(
                        grad_kept, mask.reshape(grad_kept.shape), 1.0 / (1.0 - ctx.p))
                # One launch for the product and the sum.
                grad_x = torch.addmm(grad_kept.to(ctx.compute_dtype), grad.to(ctx.compute_dtype), weight)
                grad_x = grad_x.to(x_dtype).view(ctx.x_shape)
            return grad_x, None, None, grad_a, grad_b, None, None, None

    return LoraOnNF4
