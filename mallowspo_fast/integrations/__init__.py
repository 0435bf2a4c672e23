"""Our fused op and losses inside other RLHF code (TRL, OpenRLHF, verl).

This package sits above ``ops`` and ``losses``; nothing below imports it.
"""
