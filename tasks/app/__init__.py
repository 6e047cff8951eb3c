"""The harness every task runs in: from the command line to a trained, logged, summarised run.

``config`` (schemas and checks), ``cli`` (command line -> validated config), ``registry``
(``task=`` -> TaskSpec), ``runner`` (build, fit, test, summarise), ``module`` and ``data``
(the LightningModule and data module every task derives from), ``loggers`` (W&B and CSV,
provenance), ``rundir`` (run directories, resuming), ``callbacks`` (``DDNProfiler``,
``StepTimer``), ``layers`` (finding declarative layers, setting their backward mode),
``optim``, ``summary`` (what a run prints at its start and end), ``stats`` (median, quartiles,
count), ``quiet`` (the libraries' noise filtered where it is printed; the layers' warnings
explained once).
"""
