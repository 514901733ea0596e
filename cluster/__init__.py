"""Running v2gfleet: the embedded runtime, the Python client and the `v2g` command."""
