"""rexrag_fast.engine"""
