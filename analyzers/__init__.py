"""Reasoning over stored spans and logs: transactions, edges, findings, recommendations."""
