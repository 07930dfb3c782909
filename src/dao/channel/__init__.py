"""The agent channel: the one outbound WebSocket between a host's ``dao agent`` and the console, as pure
protocol pieces (frames, the metrics outbox, the ledger of commands run) that both sides use. No I/O here;
see ``docs/agent.md`` for the whole protocol."""
