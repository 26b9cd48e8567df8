"""Judging heatmaps, offline, on a model and images (docs/trust.md).

sanity.py        the model-parameter randomisation test (Adebayo et al., 2018): torch
similarity.py    Spearman rank correlation and SSIM of two maps (numpy)
report.py        the sanity check's numbers, verdict, table and JSON (no torch)
plot.py          its plot, drawn with Pillow (no torch)
command.py       ``gradcam-service sanity``: image files in, table, PNG and JSON out
audit.py         ``gradcam-service audit``: where a model looks over a dataset, resumable
audit_report.py  the audit's report.json and standalone report.html
"""
