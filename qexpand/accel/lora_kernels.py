"""Training on a 4-bit base with fewer launches: one autograd function per LoRA layer or group of
sibling layers, torch's RMSNorm, one function for the rotary embedding.

A training step of the default recipe was bound by the host, not the GPU: the GPU ran kernels about
half of an eager step and about half of a compiled one (bench/RESULTS.md). peft's forward of a LoRA
layer on a bitsandbytes NF4 base goes through four modules and one autograd function of Python, and
launches a defensive copy of the base output, a separate scaling and a separate addition. Here the
whole layer is one autograd function: the base product, the dropout, the two LoRA products and the
scaled addition (one addmm), with a hand-written backward. Layers that the block calls on the same
input (query, key and value; gate and up) are one call: they share one dropout of the input (peft
draws a mask per layer: with dropout, siblings here see the same mask, each layer the same
distribution as in peft) and one product with their A matrices stacked, and the input's gradient
gathers their products in place. The block scales of each 4-bit weight are
de-quantized once when the layers are fused (double quantization stores them in 8 bits, and
bitsandbytes would de-quantize them again in each of the three de-quantizations of a step: two
launches each); with re-entrant recomputation the weights de-quantized for the recomputation also
serve the backward pass. The parameters stay peft's, so the adapter is saved and loaded exactly as
before. Only the plain case is fused (one active adapter, no DoRA, no biases, not merged, in training
mode); every other call goes through peft's own forward. The LoRA weights are cast to the products'
dtype once per optimizer step, the model's RMSNorms run as torch's single operator while training,
and the rotary position embedding of queries and keys is one autograd function with a hand-written
backward (`rotary_for_training`). `fused_training` installs all of it and takes all of it away again.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
import weakref
from typing import Any, NamedTuple


# Sibling layers that the usual decoder blocks (Llama, Mistral, Qwen, Gemma) call one after another on
# the same input; each set is fused into one autograd function where their adapters agree.
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def weights_can_wait_for_backward(checkpointing: bool, reentrant: bool) -> bool:
    """Whether `fuse_lora_layers` may keep each de-quantized weight from a recording forward pass for
    the backward pass: only with re-entrant recomputation, which records one block at a time."""
    return checkpointing and reentrant


@contextlib.contextmanager
def fused_training(model, keep_weights_for_backward: bool):
    """While inside, the model trains through the fused LoRA layers (`fuse_lora_layers`), torch's RMSNorm
    (`fuse_rms_norms`) and the one-function rotary embedding (`rotary_for_training`); on leaving, every
    forward, attribute, library function and the optimizer-step hook installed for them is taken away."""
    from qexpand.accel import checked_versions
    from qexpand.errors import UserError

    checked_versions.require("fused_layers")
    try:
        if not fuse_lora_layers(model, keep_weights_for_backward=keep_weights_for_backward):
            raise UserError("--lora-kernels fused found no LoRA layer it can fuse (it fuses plain LoRA on "
                            "bitsandbytes 4-bit layers without biases). Pass --lora-kernels peft.")
        fuse_rms_norms(model)
        with rotary_for_training(model):
            yield
    finally:
        unfuse_rms_norms(model)
        unfuse_lora_layers(model)


# Attributes `fuse_lora_layers` sets on a layer (plain attributes: the state dict stays peft's).
FUSED_LAYER_ATTRIBUTES = ("forward", "nf4_weight", "keep_weights_for_backward", "sibling_group", "lora_weight_casts")


def fuse_lora_layers(model, group_siblings: bool = True, keep_weights_for_backward: bool = False) -> int:
    """Route every fusable peft LoRA layer on a bitsandbytes 4-bit base through `lora_on_nf4()`, sibling
    layers on one input as one call (`group_siblings`); returns how many layers were routed.
    `keep_weights_for_backward` keeps a layer's de-quantized base weight from a forward pass that records
    gradients to its backward pass, one de-quantization fewer per layer and step: only for re-entrant
    recomputation, where just one block's forward pass records at a time (Mistral-7B: one block's
    weights, 0.44 GB in bf16); without recomputation it would hold every de-quantized weight of the
    model. `unfuse_lora_layers` undoes it."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    # The function is looked up here, not in the forward: torch.compile then sees it as a constant.
    forward = functools.partial(fused_forward, function=lora_on_nf4())
    OPTIMIZER_STEPS.count_for(model)  # counting from before the first step
    routed = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear4bit) and fusable(module):
            weight = module.get_base_layer().weight
            module.nf4_weight = (weight.quant_state, nf4_operands(weight))
            module.keep_weights_for_backward = keep_weights_for_backward
            module.__dict__.pop("sibling_group", None)  # fused again: grouped anew below, or not at all
            module.forward = types.MethodType(forward, module)
            routed[name] = module
    if group_siblings:
        form_sibling_groups(routed)
    return len(routed)


def unfuse_lora_layers(model) -> int:
    """Give every layer `fuse_lora_layers` routed its own forward back and drop what was kept on it;
    returns how many layers were given back."""
    restored = 0
    for module in model.modules():
        if "nf4_weight" in module.__dict__:
            for attribute in FUSED_LAYER_ATTRIBUTES:
                module.__dict__.pop(attribute, None)
            restored += 1
    OPTIMIZER_STEPS.stop_counting_for(model)
    return restored


class OptimizerStepCounter:
    """How many optimizer steps any optimizer of this process has taken while counting, through a
    process-wide hook of torch's: held while some model has fused layers, removed after the last one
    is unfused. The count never goes back, so a cast keyed by it is never taken for a later one."""

    def __init__(self):
        self.steps = 0
        self.models = weakref.WeakSet()  # the models with fused layers
        self.hook = None

    def count_for(self, model) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.models.add(model)
        if self.hook is None:
            self.hook = register_optimizer_step_post_hook(self.count)

    def stop_counting_for(self, model) -> None:
        self.models.discard(model)
        if not self.models and self.hook is not None:
            self.hook.remove()
            self.hook = None

    def count(self, optimizer, args, kwargs) -> None:
        self.steps += 1


OPTIMIZER_STEPS = OptimizerStepCounter()


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


def unfuse_rms_norms(model) -> int:
    """Give every RMSNorm `fuse_rms_norms` routed its own forward back; returns how many."""
    restored = 0
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) is fused_rms_norm_forward:
            del module.__dict__["forward"]
            restored += 1
    return restored


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


def nf4_operands(weight) -> tuple:
    """What bitsandbytes' de-quantization takes for a 4-bit weight, decided once: its packed bytes as a
    plain tensor (its parameter class runs Python code for every operator it takes part in, about 8
    microseconds of host time a call on the CPU), the block scales in float32, and the format."""
    state = weight.quant_state
    return (weight.data, block_scales(state), state.blocksize, state.quant_type, state.shape, state.dtype)


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


class SiblingGroup:
    """Layers of one module that the model calls one after another on the same input (a block's query,
    key and value projections; its gate and up projections): the first one called computes them all in
    one autograd function and keeps the others' outputs until they are called with that same input."""

    def __init__(self, members):
        self.members = tuple(members)
        self.pending = None  # (the input, {member: its output}) between the leader's call and theirs

    def take(self, layer, x):
        """The output the leader computed for `layer` from this very `x`, or None (computed alone then)."""
        if self.pending is None or self.pending[0] is not x or layer not in self.pending[1]:
            return None
        output = self.pending[1].pop(layer)
        if not self.pending[1]:
            self.pending = None  # nothing left: the input is no longer held
        return output


def form_sibling_groups(layers_by_name: dict) -> None:
    """Give each set of same-parent layers named in SHARED_INPUT_SIBLINGS whose LoRA A matrices have one
    shape (input width and rank: they are stacked into one product) one SiblingGroup. What else they
    must share (dtypes, scaling, dropout) is compared at every call (LayerCall.settings), since adapters
    can change after fusing."""
    for parent in dict.fromkeys(name.rpartition(".")[0] for name in layers_by_name):
        for names in SHARED_INPUT_SIBLINGS:
            members = [layers_by_name[f"{parent}.{name}"] for name in names if f"{parent}.{name}" in layers_by_name]
            if len(members) > 1 and len({lora_a_shape(layer) for layer in members}) == 1:
                group = SiblingGroup(members)
                for layer in members:
                    layer.__dict__["sibling_group"] = group  # a plain attribute: not a submodule


def lora_a_shape(layer):
    return layer.lora_A[plain_adapter(layer)].weight.shape


def fused_forward(self, x, *args, function=None, **kwargs):
    """The forward that `fuse_lora_layers` installs on a layer (`function` is `lora_on_nf4()`)."""
    import torch

    group = self.__dict__.get("sibling_group")
    if group is not None:
        output = group.take(self, x)
        if output is not None:
            return output
    call = fused_call(self, x, args, kwargs)
    if call is None:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    members, calls = (self,), [call]
    # Only the first sibling leads, and only eagerly: a compiled block traces each layer alone.
    if group is not None and group.members[0] is self and not torch.compiler.is_compiling():
        others = [fused_call(layer, x, (), {}) for layer in group.members[1:]]
        if all(other is not None and other.settings() == call.settings() for other in others):
            members, calls = group.members, [call, *others]
    lora_as, lora_bs = [c.lora_a for c in calls], [c.lora_b for c in calls]
    casts = cast_lora_weights(group if len(members) > 1 else self, lora_as, lora_bs, call.lora_dtype)
    keep = self.keep_weights_for_backward and torch.is_grad_enabled()
    spec = (tuple(c.nf4 for c in calls), call.compute_dtype, call.scaling, call.p, keep)
    outputs = function.apply(x, spec, casts, *lora_as, *lora_bs)
    if len(members) > 1:
        group.pending = (x, dict(zip(members[1:], outputs[1:])))
    return outputs[0]


class LayerCall(NamedTuple):
    """What the fused function needs of one layer in one call."""

    nf4: tuple  # the 4-bit weight's packed bytes, block scales and format (nf4_operands)
    compute_dtype: Any  # the base product's dtype
    lora_dtype: Any  # the LoRA products' dtype
    lora_a: Any
    lora_b: Any
    scaling: float
    p: float  # dropout

    def settings(self) -> tuple:
        """What siblings computed in one call must share."""
        return self.compute_dtype, self.lora_dtype, self.scaling, self.p


def fused_call(layer, x, args, kwargs) -> LayerCall | None:
    """What the fused function needs for `layer` in this call; None where peft's own forward must run."""
    import torch

    # Training steps only: eval passes are few. And only while the weight is the one whose scales were
    # de-quantized at fusing: bitsandbytes repacks 4-bit weights for the CPU in place at inference,
    # after which only its own forward reads them.
    adapter = plain_adapter(layer)
    base = layer.get_base_layer()
    state, nf4 = layer.nf4_weight
    scales = nf4[1]
    same_weight = base.weight.quant_state is state and not getattr(state, "packing_format_for_cpu", False)
    if (not layer.training or args or kwargs or layer.disable_adapters or layer.merged or adapter is None
            or not same_weight or scales.device != x.device):
        return None
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0  # Identity when dropout is 0
    device = x.device.type
    # Under autocast peft runs the LoRA products in the autocast dtype; without it, in the LoRA
    # weights' own dtype, casting the result back.
    lora_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                  else layer.lora_A[adapter].weight.dtype)
    return LayerCall(nf4, base.compute_dtype or x.dtype, lora_dtype, layer.lora_A[adapter].weight,
                     layer.lora_B[adapter].weight, float(layer.scaling[adapter]), p)


def cast_lora_weights(holder, lora_as, lora_bs, dtype):
    """The LoRA weights of one layer or one sibling group in the dtype the products run in: the A
    matrices stacked into one (members x r, in) matrix, the B matrices as they are. Made once per
    optimizer step, not in every forward pass: the weights are float32 and the products bf16 under
    autocast, and with recomputation each weight went through two casts a step (Mistral-7B: 448
    launches a step, bench/RESULTS.md). A cast stays valid while no optimizer step has been taken since
    (in this process, by any optimizer), no weight has been written to (their version counters; torch's
    fused AdamW leaves those as they are, hence the step count) and none has moved."""
    import torch

    if torch.compiler.is_compiling():  # a compiled block fuses the casts into its own kernels
        return stacked_lora_weights(lora_as, lora_bs, dtype)
    weights = (*lora_as, *lora_bs)
    key = (dtype, OPTIMIZER_STEPS.steps, *((w._version, w.data_ptr()) for w in weights))
    cached = holder.__dict__.get("lora_weight_casts")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, stacked_lora_weights(lora_as, lora_bs, dtype))
        holder.__dict__["lora_weight_casts"] = cached  # a plain attribute: not in the state dict
    return cached[1]


def stacked_lora_weights(lora_as, lora_bs, dtype):
    import torch

    a_stack = lora_as[0].detach().to(dtype) if len(lora_as) == 1 else torch.cat(
        [a.detach().to(dtype) for a in lora_as])
    return a_stack, tuple(b.detach().to(dtype) for b in lora_bs)


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
        """For each member i of a layer or sibling group: y_i = x W_i^T + scaling * dropout(x) A_i^T B_i^T,
        W_i in NF4; the gradients of x and of every A_i and B_i. The members share the input, its dropout
        mask and one product with their A matrices stacked; each has its own base product and output."""

        @staticmethod
        def forward(ctx, x, spec, casts, *lora_weights):
            nf4s, compute_dtype, scaling, p, keep_weights = spec
            a, bs = casts  # (members x r, in) and each member's (out_i, r), in the LoRA products' dtype
            flat_x = x.reshape(-1, x.shape[-1])
            rank = bs[0].shape[1]
            outputs, weights = [], []
            with torch.autocast(x.device.type, enabled=False):
                kept, mask = flat_x.to(a.dtype), None
                if p > 0:
                    kept, mask = torch.native_dropout(kept, p, True)
                low = linear(kept, a)  # (tokens, members x r)
                base_input = flat_x.to(compute_dtype)
                for i, (nf4, b) in enumerate(zip(nf4s, bs)):
                    weight = dequantized(nf4, compute_dtype)
                    base = linear(base_input, weight)
                    member_low = low[:, i * rank:(i + 1) * rank]
                    if a.dtype == compute_dtype:
                        base.addmm_(member_low, b.t(), alpha=scaling)
                    else:
                        base.add_((linear(member_low, b) * scaling).to(compute_dtype))
                    outputs.append(base.to(x.dtype).view(*x.shape[:-1], base.shape[-1]))
                    weights.append(weight if keep_weights else None)
            ctx.save_for_backward(kept, low, mask, a, *bs)
            ctx.kept_weights, ctx.spec, ctx.x_shape = weights, spec, x.shape
            ctx.grad_dtypes = (x.dtype, [w.dtype for w in lora_weights])
            return tuple(outputs)

        @staticmethod
        def backward(ctx, *grads):
            kept, low, mask, a, *bs = ctx.saved_tensors
            nf4s, compute_dtype, scaling, p, _ = ctx.spec
            x_dtype, weight_dtypes = ctx.grad_dtypes
            members, rank = len(bs), bs[0].shape[1]
            grads = [g.reshape(-1, g.shape[-1]).to(a.dtype) for g in grads]
            # The low-rank products' gradient, transposed (members x r, tokens): each member writes its
            # rows, the scaling rides in the products (no pass over the output gradient for it).
            grad_low_t = torch.empty(members * rank, grads[0].shape[0], dtype=a.dtype, device=a.device)
            grad_bs = []
            for i, (g, b) in enumerate(zip(grads, bs)):
                rows = grad_low_t[i * rank:(i + 1) * rank]
                torch.addmm(rows, b.t(), g.t(), beta=0, alpha=scaling, out=rows)
                grad_b = torch.addmm(b, g.t(), low[:, i * rank:(i + 1) * rank], beta=0, alpha=scaling)
                grad_bs.append(grad_b.to(weight_dtypes[members + i]))
            grad_a = (grad_low_t @ kept).to(weight_dtypes[0])
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_kept = grad_low_t.t() @ a  # (tokens, in)
                if mask is not None:
                    grad_kept = torch.ops.aten.native_dropout_backward(grad_kept, mask, 1.0 / (1.0 - p))
                for nf4, g, weight in zip(nf4s, grads, ctx.kept_weights):
                    weight = dequantized(nf4, compute_dtype) if weight is None else weight
                    # Each product and the sum in one launch: the first onto the dropout's gradient, the
                    # other members' in place onto that.
                    grad_x = (torch.addmm(grad_kept.to(compute_dtype), g.to(compute_dtype), weight) if grad_x is None
                              else grad_x.addmm_(g.to(compute_dtype), weight))
                grad_x = grad_x.to(x_dtype).view(ctx.x_shape)
            return (grad_x, None, None, *grad_a.split(rank), *grad_bs)

    return LoraOnNF4


@contextlib.contextmanager
def rotary_for_training(model):
    """While inside, the rotary position embedding of the model's attention (the library module's
    `apply_rotary_pos_emb`, which the attention calls from its module) is `rotary_embedding`: the same
    forward arithmetic, rounding for rounding, as one autograd function with a hand-written backward.
    The library's launches five operators for each of q and k in a forward pass (a product, the negated
    half, the two halves joined, a product, a sum) and about nine in the backward pass (the joined halves
    taken apart into zeroed buffers and summed back); with recomputation that is about 38 launches per
    block and step, here 22 (a copy swaps the halves, the sine carries the sign and is signed once per
    forward pass, and the backward pass is three operators per tensor). A module's function is replaced
    only if it computes what ours does on a probe (the half-split form of Llama and Mistral); calls ours
    does not handle (rotation of part of a head, sine or cosine that need gradients, mixed dtypes) go to
    the library's own. Yields how many modules' functions were replaced; each is put back on leaving."""
    replaced = []
    for name in sorted({type(module).__module__ for module in model.modules()}):
        library_module = sys.modules.get(name)
        original = getattr(library_module, "apply_rotary_pos_emb", None)
        if callable(original) and not isinstance(original, functools.partial) and rotates_halves(original):
            library_module.apply_rotary_pos_emb = functools.partial(rotary_embedding, library_rotary=original)
            replaced.append((library_module, original))
    try:
        yield len(replaced)
    finally:
        for library_module, original in replaced:
            library_module.apply_rotary_pos_emb = original


def rotates_halves(library_rotary) -> bool:
    """Whether `library_rotary(q, k, cos, sin)` computes what `rotary_function()` does, q cos +
    rotate_half(q) sin (and so for k), the half-split rotary embedding, tried in float32 on random values."""
    import torch

    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=generator), torch.randn(2, 2, 5, 8, generator=generator)
    cos, sin = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
    try:
        with torch.no_grad():
            theirs = library_rotary(q, k, cos, sin)
    except Exception:  # another signature or layout: not ours to replace
        return False
    rotation, signed_sine = rotary_function()
    with torch.no_grad():
        ours = rotation.apply(q, k, cos.unsqueeze(1), signed_sine(sin).unsqueeze(1))
    return (isinstance(theirs, tuple) and len(theirs) == 2
            and all(t.shape == o.shape and torch.allclose(t, o, atol=1e-6) for t, o in zip(theirs, ours)))


def rotary_embedding(q, k, cos, sin, unsqueeze_dim=1, *args, library_rotary=None, **kwargs):
    """`apply_rotary_pos_emb` while `rotary_for_training` is in force: `rotary_function()` for the plain
    case, the library's own function otherwise."""
    head = q.shape[-1]
    plain = (not args and not kwargs and head % 2 == 0 and cos.shape[-1] == head == k.shape[-1]
             and sin.shape == cos.shape and q.dtype == k.dtype == cos.dtype == sin.dtype
             and not cos.requires_grad and not sin.requires_grad)
    if not plain:
        return library_rotary(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)
    rotation, signed_sine = rotary_function()
    return rotation.apply(q, k, cos.unsqueeze(unsqueeze_dim), signed_sine(sin).unsqueeze(unsqueeze_dim))


@functools.cache
def rotary_function():
    """The autograd function of the rotary embedding, and the cached signed sine it takes."""
    import torch

    def swapped_halves(x):
        """x with its two halves of the last dimension swapped: one copy."""
        return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)

    # rotate_half(x) * sin == swapped_halves(x) * [-sin_1, sin_2] (a sign moves from one factor to the
    # other: exact). Every block of a forward pass gets the same sine tensor: it is signed once.
    last = [None, None, None]  # the sine, its version counter, its signed form

    def signed_sine(sin):
        if last[0] is not sin or last[1] != sin._version:
            first, second = sin.chunk(2, dim=-1)
            last[:] = sin, sin._version, torch.cat((-first, second), dim=-1)
        return last[2]

    def rotated(x, cos, signed_sin):
        return x * cos + swapped_halves(x) * signed_sin  # the library's products and sum, in its order

    class RotaryEmbedding(torch.autograd.Function):
        """(q, k) -> (q cos + rotate_half(q) sin, k cos + rotate_half(k) sin); the gradient of each is
        g cos + swapped_halves(g * signed sine), the rotation's transpose."""

        @staticmethod
        def forward(ctx, q, k, cos, signed_sin):
            ctx.save_for_backward(cos, signed_sin)
            return rotated(q, cos, signed_sin), rotated(k, cos, signed_sin)

        @staticmethod
        def backward(ctx, grad_q, grad_k):
            cos, signed_sin = ctx.saved_tensors
            grads = [None if g is None else torch.addcmul(swapped_halves(g * signed_sin), g, cos)
                     for g in (grad_q, grad_k)]
            return grads[0], grads[1], None, None

    return RotaryEmbedding, signed_sine
