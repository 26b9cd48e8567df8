"""Judging heatmaps, offline, on a model and images (docs/trust.md); the commands that
run these checks are ``cli/sanity.py`` and ``cli/audit.py``.

sanity.py        the model-parameter randomisation test (Adebayo et al., 2018): torch
similarity.py    Spearman rank correlation and SSIM of two maps (numpy)
report.py        the sanity check's numbers, verdict, table and JSON (no torch)
plot.py          its plot, drawn with Pillow (no torch)
inputs.py        the image files a command is given: folders (recursive) and files
audit.py         where a model looks over a dataset: the run, resumable
audit_inputs.py  what an audit reads: images or DICOMweb studies by key, the boxes file
audit_records.py an image's record: where its map's mass lies, judged
audit_log.py     the resumable log: the settings line, one record per image
audit_report.py  the audit's report.json and standalone report.html
"""
