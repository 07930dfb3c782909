"""`dao pull`: a drop-in for `docker pull` (see docs/pull.md)."""
