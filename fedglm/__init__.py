"""fedglm: federated fine-tuning of a GLM-style language model across hospitals, on Flower."""

__version__ = "0.1.0"
