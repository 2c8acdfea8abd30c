"""Integrations of Hyper-DM with other tools (the MONAI Label app: :mod:`hyper_dm.integrations.monailabel`)."""
