"""Protocol knowledge: references, digests, media types, error bodies. Pure functions and types, no I/O."""
