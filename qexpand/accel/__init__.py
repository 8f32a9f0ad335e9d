"""The speed machinery, behind one boundary: everything here only makes training or generation faster,
and each part is installed by one context manager that takes it away again on leaving.

- `lora_kernels.fused_training`: fused LoRA layers on the 4-bit base, torch's RMSNorm and the rotary
  embedding as one function (training.py --lora-kernels fused, the default recipe's choice on CUDA);
- `labelled_loss.loss_at_labelled_positions`: the output layer and the loss only at the positions that
  are scored, a chunk at a time (training.py's default path; the memory of a large vocabulary);
- `batches.balanced_batches`: several processes' batches of equal padded size, gradients kept in DDP's
  buckets; `operation_tally.operations_counted_once`: the Trainer's operation tally without walking
  the model at every batch (`training_speedups` enters these two);
- `graphed_decoding.graphed_greedy_decoding`: greedy decoding with the step replayed as a CUDA graph.

`checked_versions` lists the private library APIs they rely on and refuses to start a part on library
versions it was not checked on. The stock path (`training.py --stock`, `testing_finetuned_model.py
--stock`) installs none of it. Nothing here is imported until it is used.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def training_speedups(trainer, pad_to: int | None):
    """The Trainer-side speed-ups of one training run: the loss at labelled positions, the operation tally
    counted once and, with several processes, the balanced batches (see the modules)."""
    from qexpand.accel.batches import balanced_batches
    from qexpand.accel.labelled_loss import loss_at_labelled_positions
    from qexpand.accel.operation_tally import operations_counted_once

    with (loss_at_labelled_positions(trainer, trainer.model), operations_counted_once(trainer),
          balanced_batches(trainer, pad_to)):
        yield


def refuse_unchecked_versions(fused_layers: bool) -> None:
    """Refuse, before any model is loaded, a training run whose speed-ups would meet library versions they
    were not checked on (the context managers check again as they install)."""
    from qexpand.accel import checked_versions

    for part in ("trainer_hooks", "labelled_loss") + (("fused_layers",) if fused_layers else ()):
        checked_versions.require(part)
