"""containerd API messages lazypull speaks: .proto sources and their generated modules
(regenerate with `python tools/generate-protos.py`)."""
