"""diffsteer: composable controlled generation for Stable-Diffusion-style latent diffusion models."""

__version__ = "0.1.0"
