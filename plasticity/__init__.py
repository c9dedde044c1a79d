"""plasticity: methods against plasticity loss, and the diagnostics that show it, for any PyTorch loop.

Imports neither ``envs`` nor ``agents``.  Methods (each with its flags dataclass):
``swr`` (Soft Weight Rescaling), ``cbp`` (Continual Backprop), ``resets`` (Shrink &
Perturb, ReDo, head reset), ``regularizers`` (L2, L2-Init); ``interventions`` puts
them behind one object (``Interventions(model, optimizer, swr=1e-3, cbp=True)``).
Also ``networks`` (torsos, ``layer_map``), ``losses`` (regression, HL-Gauss,
two-hot, C51), ``diagnostics`` and ``rank`` (metrics), ``flags`` (declared ranges).
See README.md, "Use the methods in your own loop".
"""
