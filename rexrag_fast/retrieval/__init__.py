"""rexrag_fast.retrieval"""
