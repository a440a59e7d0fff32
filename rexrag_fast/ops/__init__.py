"""rexrag_fast.ops"""
