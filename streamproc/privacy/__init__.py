"""Statistical privacy, pure: privacy-budget accounting (:mod:`.budget`) and
re-identification risk measurement (:mod:`.risk`).

Nothing here does I/O: the accountant's state is bytes the runtime stores (a compacted
changelog topic), and the risk window is fed the values an audience receives.  Both sit
beside the operators, below the policy, so the policy model can validate its settings
against them and the pipeline and runtime can use them.
"""
