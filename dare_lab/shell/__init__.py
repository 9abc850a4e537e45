"""The Hydra shell: the ``dare-lab`` entry point, its config checks, sweeps, run identity,
and the Python twin of the command (:func:`dare_lab.merge`).

Nothing here is imported by the inner rings; importing this package pulls in nothing heavy.
"""
