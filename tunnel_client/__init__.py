"""tunnel-client: the command-line client of the identity-aware TCP tunnel."""
