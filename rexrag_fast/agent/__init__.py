"""rexrag_fast.agent"""
