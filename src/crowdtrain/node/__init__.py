"""The trainer node: pull the model, train locally, push compressed updates."""
