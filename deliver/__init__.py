"""deliver daemon."""
