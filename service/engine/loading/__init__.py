"""Loading a model as the models file describes it: its architecture, its weights from a
checkpoint or torchvision, what it outputs, and the errors that name the model and key."""
