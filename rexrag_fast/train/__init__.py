"""rexrag_fast.train"""
