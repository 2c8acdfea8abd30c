"""Forward models: sparse-view parallel-beam CT (:mod:`.ct`) and single-coil Cartesian MRI (:mod:`.mri`).

``hyper_dm.physics.mri`` imports fastMRI (the ``[mri]`` extra); import it explicitly when it is needed.
"""

from .ct import MU_WATER_PER_MM, ParallelBeamCT, hu_to_mu, mu_to_hu

__all__ = ["MU_WATER_PER_MM", "ParallelBeamCT", "hu_to_mu", "mu_to_hu"]
