"""Diffusion building blocks: DDIM steps, prompts, attention processors, TokenFlow."""
