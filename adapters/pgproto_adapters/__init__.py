"""IO adapters for pgproto: DNS, sockets, timers and event loops live here.

The sans-IO core (:mod:`pgproto`) never imports this package.
"""
