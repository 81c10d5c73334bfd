"""The FUSE manager: a long-lived process that owns the FUSE mount of lazy layers.

The snapshotter service talks to it over a unix socket, so the service can be
restarted (upgraded, or killed) while running containers keep reading their lazy
files: the mount, the fetchers and the chunk cache live here, not in the service.
"""
