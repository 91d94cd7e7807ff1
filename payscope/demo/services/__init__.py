"""The demo's services: ordinary web apps with ordinary (badly chosen) timeouts, knowing nothing of payscope."""
