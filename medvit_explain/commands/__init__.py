"""Click commands, one module each; ``medvit_explain.cli`` assembles them.

Top-level imports in these modules stay light (click, the registry): heavy imports go inside the
command functions so ``medvit-explain --help`` is instant.
"""
