"""The ways to pay, behind one engine: each rail offers, recognizes, checks, takes, settles and
releases its own payments (:class:`~farebox.rails.base.Rail`); the gate does the rest."""
