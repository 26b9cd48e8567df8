"""The contract: request and response models, error codes, settings (no torch, no Flask)."""
