"""Demo and test models: our seed-style Mamba and small random-weight HF builders.

There is no model hub here, so every model is built from a config with seeded
random weights."""
