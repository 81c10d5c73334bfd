"""Fixtures that start real components (registry, token server, containerd) for tests."""

pytest_plugins = [
    "tests.fixtures.registry",
    "tests.fixtures.token_server",
    "tests.fixtures.containerd",
    "tests.fixtures.snapshotter",
    "tests.fixtures.fault_proxy",
]
