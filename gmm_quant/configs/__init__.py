"""One module per experiment; each defines ``get_config() -> Config``."""
