"""`dao clean`: plan-then-apply garbage collection for Docker hosts."""
