"""``dao agent``: the host's side of host management (issue 14): enrol with a console, then keep one
outbound channel to it (``docs/agent.md``), report facts, metrics and the engine's state, run the named
operations. A composer: it uses the features (pull, clean) and the engine, never the other way round."""
