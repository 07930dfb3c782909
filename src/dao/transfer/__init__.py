"""Getting a blob's bytes over many connections: scheduling byte ranges, reading them, choosing how many
streams to open. Used by the mirror's in-flight fetch and by ``dao pull``; below the features, above the
registry client whose blob responses it reads."""
