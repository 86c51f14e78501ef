"""authd daemon."""
