"""Governed training inside the training frameworks teams already use (specs/api.md §4).

Each integration is one module, imported by name so that its framework stays an optional extra:

- ``gradledger.training.integrations.huggingface``: ``GovernedTrainer``, a ``transformers.Trainer``
  whose optimizer steps are signed GovernedUpdates (``pip install 'gradledger[hf]'``).
- ``gradledger.training.integrations.lightning``: ``GovernedLightning``, a Lightning callback and
  precision plugin for automatic optimization (``pip install 'gradledger[lightning]'``).

An integration adds no rule of its own: it hands the framework's model, optimizer and batches to
``govern`` and maps the framework's options onto the idioms specs/api.md §2 records or refuses.
"""
