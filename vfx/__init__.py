"""vfx: diffusion-based video editing and subject personalization as resumable stages."""

__version__ = "0.1.0"
