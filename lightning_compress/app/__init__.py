"""The Hydra application behind the ``lightning-compress`` command."""
