"""Training: the joint AR + block-diffusion objective, offline data, recipes and the trainer."""
