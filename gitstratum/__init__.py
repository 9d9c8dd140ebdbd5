"""GitStratum: a distributed Git server for CI/CD that builds each pack once."""

__all__ = ["__version__"]

__version__ = "0.1.0"
