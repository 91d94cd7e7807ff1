"""Instrumentation that runs inside the user's services; imports nothing else of payscope."""
