"""Teacher adapters: what stage 1 knows about each family of text-to-image diffusion models (see `base`)."""
