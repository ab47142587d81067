"""Fakes of external services, for tests only (never imported by lib/)."""
