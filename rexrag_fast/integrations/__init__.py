"""Adapters that put rexrag-fast's ops inside other trainers (verl). Each imports its host lazily."""
