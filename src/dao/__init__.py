"""dao: fast, tidy Docker image distribution where the link to the registry is slow, lossy or metered."""

__version__ = "0.1.0"
