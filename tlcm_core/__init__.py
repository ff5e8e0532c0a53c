"""TLCM: data-free few-step distillation of latent diffusion models (the library; never imports prefect)."""

__version__ = "0.1.0"
