"""``sft ui``: a read-only local dashboard over a runs directory (sft.ui.server), and the reading
of run folders it is built on (sft.ui.runs)."""
