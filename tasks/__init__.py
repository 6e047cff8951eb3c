"""The Lightning application around ``ddn_layers``: the harness (``tasks.app``) and the tasks.

Tasks: ``classification`` and ``matching``, one package each, registered in
``tasks/app/registry.py``.
"""
