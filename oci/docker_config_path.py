"""Where the Docker config file is: `$DOCKER_CONFIG/config.json`, else
`~/.docker/config.json`.

A module of its own so that `lazypull pull`, which only names the file to the node
service, starts without loading the credential store (logging, subprocess, threads).
"""

import os


def default_config_path() -> str:
    directory = os.environ.get("DOCKER_CONFIG") or os.path.join(
        os.path.expanduser("~"), ".docker")
    return os.path.join(directory, "config.json")
