"""``python -m ipop_switch.cli``: the same command as ``ipop-switch``."""

from . import main

main()
