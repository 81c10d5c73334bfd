"""`lazypull index`: index an image's gzip layers in place and publish the indexes
as an OCI artifact that refers to the image (see docs/gzip-index.md)."""
