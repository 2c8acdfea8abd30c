"""The MONAI Label app folder's entry point: ``monailabel start_server --app <this folder>`` finds the app here."""

from hyper_dm.integrations.monailabel.app import HyperDMApp  # noqa: F401  (MONAI Label looks up this class)
