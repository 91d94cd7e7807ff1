"""The terminal UI for walking failed transactions."""
