"""Training: the loop every rank runs, and the state a killed run resumes from."""
