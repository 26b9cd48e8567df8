"""One explanation, from a request to its answer: validate, prepare each image, run the
engine, render, make DICOM objects, store (no torch, no Flask)."""
