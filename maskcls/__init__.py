"""Train and use one face-mask status classifier (18 classes). Knows nothing of Optuna."""
