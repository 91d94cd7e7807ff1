"""payscope: find out why payments fail in a microservice system."""

__version__ = "0.1.0"
