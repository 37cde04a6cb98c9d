"""Commands other than the captures: bench, doctor."""
