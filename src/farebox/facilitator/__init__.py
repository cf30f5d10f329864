"""Facilitators: who verifies a proof against the chain and settles it (in-process, or remote)."""
