"""The run harness of the two agents: flags, run folders, logging, checkpoints and resume.

Everything around the algorithm that ``agents/dqn.py`` and ``agents/c51.py`` share.  The
science (networks, methods, losses, diagnostics) is the ``plasticity`` library, which
imports nothing from here; ``run_folder`` is the torch-free contract the readers in
``scripts/`` import.
"""
