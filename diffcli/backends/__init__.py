"""What loads weights, one module per model family: diffusers pipelines, diffcli EDM/blurring models and
their nets, the digit classifier, CLIP."""
