"""The coordinator server: FastAPI app, rounds, checkpoints, evaluation."""
