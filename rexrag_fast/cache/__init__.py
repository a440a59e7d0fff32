"""rexrag_fast.cache"""
