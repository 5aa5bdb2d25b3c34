"""diffcli: a command-line toolkit for diffusion-model research."""
__version__ = "0.1.0"
