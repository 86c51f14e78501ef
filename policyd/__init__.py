"""policyd daemon."""
