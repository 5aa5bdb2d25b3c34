"""What loads weights and what a model family is: `family.Family`, the one interface every family implements;
one module per family (stable_diffusion, deepfloyd, edm; diffusers_unet: what the diffusers UNet families share);
`pipelines.load_family` (load and pick the family); diffcli model files and their nets; the digit classifier;
CLIP."""
