"""What compiles, swaps and serves the config: the immutable snapshot (``snapshot``), the one
reload path (``live``), the file watcher (``watch``), the listeners a snapshot needs
(``listeners``) and the graceful stop (``shutdown``).
"""
