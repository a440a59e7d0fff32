"""rexrag_fast.rexrag"""
