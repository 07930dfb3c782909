"""Talking to registries as a client; shared by the mirror's upstream side and ``dao pull``."""
