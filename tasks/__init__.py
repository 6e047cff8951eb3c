"""The Lightning application around ``ddn_layers``: a harness shared by every task, and the tasks.

Harness: ``config`` (schemas and checks), ``cli`` (command line -> validated config),
``registry`` (``task=`` -> TaskSpec), ``runner`` (build, fit, test, summarise), ``loggers``
(W&B and CSV, provenance), ``rundir`` (run directories, resuming), ``callbacks``
(``DDNProfiler``), ``layers`` (finding declarative layers, setting their backward mode),
``optim``, ``summary``. Tasks: ``classification``.
"""
