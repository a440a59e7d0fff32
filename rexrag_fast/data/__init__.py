"""rexrag_fast.data"""
