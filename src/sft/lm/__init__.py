"""The causal LM's forward pass as training and evaluation both run it.

- ``loss``: token-summed cross-entropy at trained positions only (chunked), ``LossModule`` (what
  DDP / FSDP2 wrap) and ``forward_loss``: the one loss that train, bench, lr-find and the held-out
  evaluation compute;
- ``attention``: padding-free (varlen) attention for packed rows.

It imports nothing of ``sft.training`` or ``sft.evaluation``: both import it.
"""
