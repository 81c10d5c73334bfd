"""Shared image and registry code: references, media types, manifests, the
registry client and OCI image layouts. Knows nothing of layer formats."""
