"""Judging heatmaps: faithfulness figures, the sanity check of a method, the audit of a
model over a dataset (docs/trust.md)."""
