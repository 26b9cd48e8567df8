"""Checks of whether the explanations can be trusted, run offline on a model and images.

sanity.py     the model-parameter randomisation test (Adebayo et al., 2018): torch
similarity.py Spearman rank correlation and SSIM of two maps (numpy)
report.py     the check's numbers, verdict, table and JSON (no torch)
plot.py       its plot, drawn with Pillow (no torch)
command.py    ``gradcam-service sanity``: image files in, table, PNG and JSON out
"""
