"""Running trained models: one loader for every kind of model path, and batched inference."""
