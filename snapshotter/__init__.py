"""The lazypull node service: a containerd snapshotter served as a proxy plugin."""
