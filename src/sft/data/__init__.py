"""Rows -> conversations -> tokens + labels -> packed batches."""
