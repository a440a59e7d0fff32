"""rexrag_fast.agent: the Search-R1 multi-turn search agent.

    template.py    Search-R1's instruction template and the chat rendering of the first prompt
    actions.py     parsing a turn's <search>/<answer> action (Search-R1's first-complete-pair rule)
    trajectory.py  per-token bookkeeping (components, loss mask, behaviour log-probs, turns), fork, packing
    loop.py        run_agent_loop: the turn loop on the engine with batched retrieval, continuation of forks
    reward.py      EM / F1 after Search-R1's normalisation, format-aware rewards
    eval_command.py  `rexrag-fast eval`
"""
