"""MONAI Label app for Hyper-DM (optional extra ``label``; docs/monailabel.md).

Modules, one concept each::

    conf      the app's --conf settings and a request's M, N, steps within the limits
    service   the loaded model: one reconstruction at a time (file lock), the last result kept
    summary   a study's mean EU over the body (the active-learning score)
    safety    loopback-only serving unless exposed deliberately
    infer     infer tasks hyperdm_mean / hyperdm_eu / hyperdm_au / hyperdm_total (MONAI Label)
    scoring   scoring method hyperdm_eu (MONAI Label)
    app       the MONAILabelApp wiring them; app_folder/main.py is the folder MONAI Label loads
    __main__  the launcher: python -m hyper_dm.integrations.monailabel --studies DIR --ckpt model.pt

``conf``, ``service``, ``summary`` and ``safety`` import without MONAI Label; the rest need the ``label`` extra.
"""
