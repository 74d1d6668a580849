"""Runbooks: one TOML file per deployment; check, bring up, watch and take down its nodes."""
