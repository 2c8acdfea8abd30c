"""Split-conformal calibration of the predicted standard deviation, per measurement-noise bin.

On held-out cases with a reference (the validation split) each pixel gives a standardised residual
``r = |label - mean| / sqrt(total)``. For a central interval ``mean +- z_level * s * sqrt(total)`` to cover a
fraction ``level`` of new pixels, the scale is ``s = r_(k) / z_level`` with ``r_(k)`` the ``k = ceil((n + 1) level)``-th
smallest of ``n`` residuals (split-conformal). One scale per level is fitted; the calibrated standard deviation map
uses the scale of ``reference_level`` (90%). Pixels are exchangeable only approximately (neighbours correlate), so
the guarantee is empirical: coverage on the test split is reported raw and calibrated.

How far off the raw spread is depends on the measurement noise (photon count, k-space noise), so with
``bins > 1`` the calibration slices are also split into bins of equal slice count by the noise level the network
itself estimates from each slice's condition (:func:`hyper_dm.networks.noise_level`, model units) and each bin gets
its own scales (Mondrian conformal prediction: coverage holds per bin). At inference a slice takes the scales of the
bin its noise level falls in (the outer bins extend to zero and infinity), so no acquisition metadata is needed.

How far off the raw spread is also depends on how much the weight sets disagree: where EU is high (edges, nodules,
anything the model is unsure of) the error outgrows the predicted spread faster than elsewhere, and one scale per
noise bin then over-covers the quiet pixels and under-covers the uncertain ones. With ``eu_bin_levels`` (e.g.
``(0.5, 0.9, 0.99)``) each noise bin's pixels are further split at those quantiles of their :func:`relative_eu` (EU
over its slice's :data:`LOCAL_EU_REFERENCE` quantile) and every EU bin gets its own scales
(:attr:`Calibration.eu_bins`); the calibrated std then takes the scale of each pixel's own EU bin
(:meth:`Calibration.scale_map`), so coverage holds per EU bin as it does per noise bin. EU is binned relative to its
own slice because patients (and draws of weight sets) differ in their level of EU: on absolute edges a patient
whose EU runs high puts most of its pixels in the wide bins and is over-covered, one whose EU runs low is
under-covered; the ratio to the slice divides that level out (calibrations before metadata 0.14.0 hold absolute
edges, :attr:`Calibration.eu_bin_reference` ``None``, and are applied so).

Air and tissue err differently against the predicted spread too: the reconstruction of air is nearly exact, that of
tissue carries its texture and edges, and scales fitted on both together cover the air beyond the nominal level and
the tissue short of it. With ``intensity_edges`` (e.g. ``(TISSUE_FLOOR,)``: -900 HU, 5% of the MRI magnitude scale)
each noise bin's pixels are first split by the value of the mean there (model units, :func:`in_model_units`) into
intensity classes, and each class gets its own scales and its own EU bins (:attr:`Calibration.intensity_edges`). The
class is read from the mean, not the reference, so inference assigns it as calibration did.

Patients differ in their level of EU too, and the error does not follow it as the predicted std does: on the CT
calibration series the tissue's 90th-percentile standardised residual falls as the EU level rises (Spearman -0.92 over
60 cases against the median over their slices of the slice's 90% EU quantile), so a patient whose weight sets happen to
agree closely is under-covered and one whose EU runs high over-covered, by more than the cases within a noise bin differ
otherwise. With ``eu_level`` each cell (a noise bin's intensity class) also fits how its slices' ``reference_level``
quantile of standardised residuals scales with the slice's EU level (its :data:`EU_LEVEL_QUANTILE` quantile of EU, model
units): a least-squares slope on log-log axes, whose negative, between 0 and :data:`EU_LEVEL_EXPONENT_MAX`, is the
cell's ``eu_level_exponent`` (a cell whose error does not fall behind its EU level, such as the air's, keeps fixed
scales, which a slope fitted on few patients would otherwise swing), and its residuals are multiplied by ``(level /
eu_level_reference) ** exponent`` (the reference: the geometric mean of its slices' levels) before its EU bins' scales
are fitted. At inference a slice's scales in that cell are divided by the same factor, its level first clipped to the
range the cell was calibrated on (``eu_level_range``), so a slice whose EU lies beyond everything calibrated on is not
narrowed further. The exponent is estimated on the calibration data itself, so the split-conformal guarantee becomes
approximate; the held-out coverage (:func:`holdout_coverage`) measures it.

An input can also lie outside what the model was trained and calibrated on (a scanner's FBP made at a finer pitch,
a photon-starved scan, metal), and then the maps understate the error however they are scaled. The calibration
therefore also keeps the :func:`input_departure` of every calibration slice: how far the reconstruction moved the
coarse content of its input. A new slice's conformal p-value (:meth:`Calibration.departure_p`) is the fraction of
calibration slices that departed at least as far; an in-distribution slice gets ``p <= alpha`` with probability at
most ``alpha``. With noise bins the reference is the slice's own bin: a photon-starved scan legitimately moves
further than a clean one, and a clean slice that moves as far as a starved one is unlike the calibration data.

The input check judges a slice as a whole; an unfamiliar *object* (metal, a lesion the training set never had)
fills a few pixels of an otherwise ordinary slice. Where the generated weight sets disagree there, EU rises far above
what it reaches anywhere on the calibration data, so the calibration also keeps :attr:`Calibration.eu_threshold`:
the split-conformal ``eu_level`` (99.9%) quantile of the calibration pixels' EU in model units (EU over the squared
magnitude scale ``gain``), and with noise bins one per bin (:attr:`Calibration.noise_eu_thresholds`): the weight
sets of a model trained to disagree where it is unsure also disagree more on a noisy input, and a threshold pooled
over all noise levels is then set by the noisiest slices and sees nothing on a quiet one. A pixel above its slice's
threshold is flagged unfamiliar (:meth:`Calibration.unfamiliar`); on data like the calibration's, at most a fraction
``1 - eu_level`` of pixels are (neighbours correlate, so the guarantee is empirical).

That absolute test misses most of an object whose EU stands far above the rest of its own slice but not above the
EU some calibration series reach at their familiar edges (series differ in EU level, and so do draws of weight
sets). A second test reads the EU of a neighbourhood against its own slice (:func:`local_eu_contrast`: the mean EU
over a box :data:`LOCAL_EU_WINDOW` of the slice's side, over the slice's :data:`LOCAL_EU_REFERENCE` quantile of EU),
which a level shared by the whole slice divides out of and over which thin familiar edges average down; its own
``eu_level`` quantile on the calibration pixels (:attr:`Calibration.local_eu_threshold`, per noise bin likewise) flags
a pixel too (and, the box being an average, up to half a box around an object). The unfamiliar map is the union
of the two tests. The thresholds hold for the weight sets they were fitted with (their ``M``, seed and way of drawing
latents, :attr:`Calibration.sampling`): EU from fewer is noisier, and another draw of weight sets gives EU another
level, which the local test divides out.

MRI masks of different accelerations leave different amounts open at the same noise level (an 8x input even reads a
lower noise level than a 4x one), so a calibration fitted on several accelerations also holds one complete
calibration per acceleration (:attr:`Calibration.accelerations`), each with its own noise bins and departures; a
case takes the one nearest its own mask's acceleration (:meth:`Calibration.at_acceleration`).

The MRI model reads magnitudes over a scale, the file's fully sampled max (fastMRI's ``max`` attribute). A challenge
file has no such attribute, and the peak of its zero-filled image is lower (the missing columns blur it), so the
calibration also keeps :attr:`Calibration.scale_ratio`, the median over many cases of the scale over the one the
zero-filled image alone gives (:func:`hyper_dm.inference.loading.zero_filled_scales`); inference multiplies the
zero-filled scale of such a file by it.

Example::

    >>> calibration = fit_calibration(residuals, noise_levels, bins=3, departures=departures)  # [Z, P], [Z], [Z]
    >>> calibration.save("bundle/models/calibration.json")
    >>> calibration = calibration.at_acceleration(mask.size / mask.sum())  # MRI: the mask's [W] acceleration
    >>> std = calibration.scales_for({"mean": mean, "eu": eu}, noise, gain, offset) * total.sqrt()  # [1, X, Y, Z]
    >>> p = calibration.departure_p(input_departure(cond, mean, gain), noise)  # [Z]: small where unlike calibration
    >>> flagged = calibration.unfamiliar(eu, gain, noise)         # [1, X, Y, Z] bool: EU beyond the calibration's
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .io import atomic_write
from .uncertainty import central_z

__all__ = ["EU_LEVEL_EXPONENT_MAX", "EU_LEVEL_QUANTILE", "INPUT_CHECK_ALPHA", "LEVELS", "LOCAL_EU_REFERENCE",
           "LOCAL_EU_WINDOW", "TISSUE_FLOOR", "UNFAMILIAR_LEVEL", "Calibration", "eu_in_model_units", "fit_calibration",
           "holdout_coverage", "in_model_units", "input_departure", "intensity_classes_valid", "local_eu_contrast",
           "relative_eu", "slice_samples", "standardised_residuals"]

LEVELS = (0.5, 0.9, 0.95)
INPUT_CHECK_ALPHA = 0.01
"""A slice whose input-departure p-value is at or below this is flagged as unlike the calibration data (with ``n``
calibration slices the smallest p-value is ``1 / (n + 1)``: 0.01 needs at least 99 of them)."""
UNFAMILIAR_LEVEL = 0.999
"""The quantile of the calibration pixels' EU above which a pixel is flagged unfamiliar."""
LOCAL_EU_WINDOW = 1 / 16
"""The side of the neighbourhood :func:`local_eu_contrast` averages EU over, as a fraction of the slice's side (four
pixels of a 64 x 64 model grid)."""
LOCAL_EU_REFERENCE = 0.9
"""The quantile of its slice's EU that :func:`relative_eu` divides a pixel's EU by."""
TISSUE_FLOOR = -0.9
"""The mean (model units) above which a pixel is tissue, below which air or background: -900 HU in CT's default
window [-1000, 1000] HU, 5% of the magnitude scale in MRI."""
EU_LEVEL_QUANTILE = 0.5
"""The quantile of a slice's EU that is its EU level: the median, which an unfamiliar object and its streaks move
little (on a study with a 30 mm metal-like disc the slices' 90% EU quantile rose up to 3x, their median at most
1.36x), and which predicts the tissue's residual level over the calibration patients as well as the 90% quantile."""
EU_LEVEL_EXPONENT_MAX = 0.5
"""The largest ``eu_level_exponent`` a cell keeps: at 0.5 a slice's calibrated std no longer grows with its EU level
(the predicted variance grows about in proportion to it), beyond it a patient whose weight sets disagree more would
get narrower intervals."""
_VARIANCE_FLOOR = 1e-12  # model units^2: keeps r finite where the model predicts no spread at all


def slice_samples(volume: torch.Tensor, max_pixels: int = 1 << 20) -> torch.Tensor:
    """The pixels of each slice of ``volume`` ``[1, X, Y, Z]`` (slice axis last) at a fixed stride, at most
    ``max_pixels`` in all: ``[Z, P]``, ``volume``'s dtype."""
    z = volume.shape[-1]
    return volume.reshape(-1, z).T[:, :: max(1, volume.numel() // max_pixels)]


def standardised_residuals(mean: torch.Tensor, total: torch.Tensor, label: torch.Tensor, gain: float = 1.0,
                           max_pixels: int = 1 << 20) -> torch.Tensor:
    """``|label - mean| / sqrt(total)`` per slice, float64 ``[Z, P]`` (:func:`slice_samples` of ``[1, X, Y, Z]``
    inputs). ``gain`` (physical units per model unit) sets the variance floor ``1e-12 gain^2``."""
    sigma = (slice_samples(total, max_pixels).double().clamp_min(0) + _VARIANCE_FLOOR * gain**2).sqrt()
    return slice_samples(label - mean, max_pixels).double().abs() / sigma


def eu_in_model_units(eu: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """EU ``[1, X, Y, Z]`` (physical units squared) over the squared magnitude scale ``gain`` (``[Z]`` or one value):
    the model's own units, comparable across files, scanners and, for MRI, each file's own scale."""
    return eu / gain.to(eu).reshape(1, 1, 1, -1) ** 2


def in_model_units(image: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """An image ``[1, X, Y, Z]`` in physical units (HU, magnitude) in the model's [-1, 1] range, with ``gain`` and
    ``offset`` ``[Z]`` (``physical = gain * model + offset`` per slice)."""
    return (image - offset.to(image).reshape(1, 1, 1, -1)) / gain.to(image).reshape(1, 1, 1, -1)


def _over_row_quantile(rows: torch.Tensor, level: float = LOCAL_EU_REFERENCE) -> torch.Tensor:
    """Each row of ``rows`` ``[Z, P]`` (one slice's EU) over its ``level`` quantile: float32 ``[Z, P]``."""
    rows = rows.float()
    return rows / rows.quantile(level, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def relative_eu(eu: torch.Tensor, level: float = LOCAL_EU_REFERENCE) -> torch.Tensor:
    """EU ``[1, X, Y, Z]`` (any units) over its slice's ``level`` quantile: dimensionless float32 ``[1, X, Y, Z]``,
    the same for a slice whose EU is ten times higher throughout."""
    z = eu.shape[-1]
    return _over_row_quantile(eu.reshape(-1, z).T, level).T.reshape(eu.shape)


def local_eu_contrast(eu: torch.Tensor, window: float = LOCAL_EU_WINDOW) -> torch.Tensor:
    """How far the EU ``[1, X, Y, Z]`` (any units) of each pixel's neighbourhood stands out from its slice: the mean
    of :func:`relative_eu` over a box ``window`` of the slice's side on a side (rounded to an odd number of pixels).
    Dimensionless float32 ``[1, X, Y, Z]``."""
    slices = relative_eu(eu)[0].permute(2, 0, 1)[:, None]  # [Z, 1, X, Y]
    box = [max(1, round(window * n)) // 2 * 2 + 1 for n in slices.shape[-2:]]
    pool = lambda x, k: F.avg_pool2d(x, k, stride=1, padding=[n // 2 for n in k], count_include_pad=False)  # noqa: E731
    return pool(pool(slices, (box[0], 1)), (1, box[1]))[:, 0].permute(1, 2, 0)[None]  # one axis at a time


def input_departure(cond: torch.Tensor, mean: torch.Tensor, gain: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """How far the reconstruction moved the coarse content of its input, per slice: the RMS over a
    ``blocks x blocks`` grid of area averages of ``cond - mean``, in model units (divided by ``gain [Z]``), ``[Z]``.

    ``cond`` and ``mean`` are ``[1, x, y, Z]`` in physical units on any in-plane grids (each is averaged to the
    block grid on its own). Noise and streaks average out over a block; what stays is a shift of the input's
    level that the model never had to make in training."""
    pooled = lambda v: F.adaptive_avg_pool2d(v[0].permute(2, 0, 1).double(), blocks)  # noqa: E731 - [Z, b, b]
    return ((pooled(cond) - pooled(mean)) / gain.double().view(-1, 1, 1)).flatten(1).pow(2).mean(1).sqrt()


def _conformal_rank(n: int, level: float) -> int:
    """Split-conformal rank of the ``level`` quantile of ``n`` scores: ``ceil((n + 1) level)``, at most ``n``."""
    return min(n, math.ceil((n + 1) * level))


def _scales(r: torch.Tensor, levels: Sequence[float]) -> dict[str, float]:
    """Split-conformal std scale per level from sorted residuals ``r``."""
    return {str(level): float(r[_conformal_rank(r.numel(), level) - 1]) / central_z(level) for level in levels}


def _nearest(accelerations: Sequence[str], acceleration: float) -> str:
    """The key of ``accelerations`` nearest ``acceleration`` on a log scale (4.9x is nearer 4x than 8x)."""
    return min(accelerations, key=lambda a: abs(math.log(float(a) / acceleration)))


def _p_values(departure: torch.Tensor, references: Sequence[list[float]]) -> torch.Tensor:
    """``(1 + #{reference departures >= d}) / (n + 1)`` for each slice's departure ``d`` ``[Z]`` and its ascending
    reference list: ``[Z]`` float64."""
    return torch.tensor([(1 + len(r) - bisect.bisect_left(r, d)) / (len(r) + 1)
                         for r, d in zip(references, departure.double().tolist(), strict=True)], dtype=torch.float64)


@dataclass
class Calibration:
    """Scales of the predicted std per central-interval level, fitted on ``n_pixels`` residuals of ``n_cases``.

    ``scales``: over all slices. ``noise_scales``: the same per noise bin (empty: one bin), the bins split at
    ``noise_edges`` (ascending, model units); ``noise_range``: the lowest and highest noise level calibrated on.
    ``departures``: the :func:`input_departure` of every calibration slice, ascending (empty: not recorded);
    ``noise_departures``: the same per noise bin (empty: one reference for all slices). ``accelerations``: MRI, a
    calibration per mask acceleration (key: the acceleration, e.g. ``"4"``; empty: one for every mask), each
    holding its ``acceleration`` (``None``: fitted on every mask). ``eu_threshold``: the ``eu_level`` quantile of
    the calibration pixels' EU in model units (``None``: not recorded), ``noise_eu_thresholds`` the same per noise
    bin (empty: one threshold for every slice); ``local_eu_window``, ``local_eu_threshold`` and
    ``noise_local_eu_thresholds``: the same for :func:`local_eu_contrast` with that window (``None``: not recorded,
    before metadata 0.13.0); ``eu_flagged_max``: the largest fraction of one calibration case's pixels flagged
    unfamiliar (:meth:`unfamiliar`). ``sampling``: the ``M``, ``N``, DDIM ``steps`` and ``seed`` (the weight sets)
    the calibration cases were reconstructed with and ``weight_draws`` (how their latents were drawn; absent:
    ``"iid"``, before metadata 0.11.0) (empty: not recorded); scales and threshold hold for those.
    ``eu_bin_levels``: the EU quantile levels that split each noise bin's pixels into EU bins (empty: no EU bins);
    ``eu_bins``: per noise bin (one entry without noise bins), ``{"edges": [...], "scales": [{level: scale}, ...]}``,
    the bin's EU edges (ascending) and each EU bin's scales, with, where fitted with ``eu_level``, its
    ``eu_level_exponent``, ``eu_level_reference`` and ``eu_level_range`` (model units; see the module docstring);
    ``eu_bin_reference``: the edges are in units of the slice's quantile of EU at this level (:func:`relative_eu`;
    ``None``: EU in model units, before metadata 0.14.0).
    ``intensity_edges``: the values of the mean (model units) that split each noise bin's pixels into intensity
    classes (ascending; empty: one class; e.g. :data:`TISSUE_FLOOR`, air against tissue); ``eu_bins``
    then holds an entry per noise bin and class (``eu_bins[noise_bin * classes + class]``), each cut into EU bins on
    its own pixels (without ``eu_bin_levels``: one EU bin).
    ``scale_ratio``: MRI, the median over the cases measured for it (:func:`hyper_dm.inference.scale_ratio_cases`:
    files of the training and validation splits) of their magnitude scale over their zero-filled image's (``None``:
    not recorded), ``scale_ratio_range`` the lowest and highest.
    """

    scales: dict[str, float]
    n_pixels: int
    n_cases: int
    checkpoint_sha256: str = ""
    reference_level: float = 0.9
    raw_coverage: dict[str, float] = field(default_factory=dict)
    noise_edges: list[float] = field(default_factory=list)
    noise_scales: list[dict[str, float]] = field(default_factory=list)
    noise_range: list[float] = field(default_factory=list)
    departures: list[float] = field(default_factory=list)
    noise_departures: list[list[float]] = field(default_factory=list)
    accelerations: dict[str, Calibration] = field(default_factory=dict)
    acceleration: float | None = None
    eu_threshold: float | None = None
    noise_eu_thresholds: list[float] = field(default_factory=list)
    eu_level: float = UNFAMILIAR_LEVEL
    eu_flagged_max: float | None = None
    local_eu_window: float | None = None
    local_eu_threshold: float | None = None
    noise_local_eu_thresholds: list[float] = field(default_factory=list)
    sampling: dict[str, int | str] = field(default_factory=dict)
    eu_bin_levels: list[float] = field(default_factory=list)
    eu_bins: list[dict] = field(default_factory=list)
    eu_bin_reference: float | None = None
    intensity_edges: list[float] = field(default_factory=list)
    scale_ratio: float | None = None
    scale_ratio_range: list[float] = field(default_factory=list)

    @property
    def groups(self) -> list[Calibration]:
        """This calibration and, after it, its per-acceleration ones."""
        return [self, *self.accelerations.values()]

    @property
    def adapts_to_eu_level(self) -> bool:
        """Whether its cells' scales follow each slice's EU level (``eu_level`` at fitting)."""
        return any("eu_level_exponent" in cell for cell in self.eu_bins)

    @property
    def scale(self) -> float:
        """The std multiplier of ``reference_level`` over all slices."""
        return self.scales[str(self.reference_level)]

    def at_acceleration(self, acceleration: float | None) -> Calibration:
        """The calibration to apply to a case of mask ``acceleration`` (k-space columns per sampled column): the one
        fitted at the nearest acceleration; this one without per-acceleration calibrations or ``acceleration``."""
        if not self.accelerations or acceleration is None:
            return self
        return self.accelerations[_nearest(list(self.accelerations), acceleration)]

    def _bins(self, noise_level: torch.Tensor) -> torch.Tensor:
        """The noise bin of each slice of noise level ``[Z]`` (model units): ``[Z]`` int64."""
        return torch.bucketize(noise_level.double(), torch.tensor(self.noise_edges, dtype=torch.float64))

    def scale_at(self, noise_level: torch.Tensor | None, level: float | None = None) -> torch.Tensor:
        """Std multipliers of ``level`` (default ``reference_level``) for slices of noise level ``[Z]`` (model
        units): ``[Z]`` float64, each slice its bin's scale; a 0-d tensor (the overall scale) with one bin or
        ``noise_level=None``."""
        key = str(self.reference_level if level is None else level)
        if not self.noise_scales or noise_level is None:
            return torch.tensor(self.scales[key], dtype=torch.float64)
        return torch.tensor([s[key] for s in self.noise_scales], dtype=torch.float64)[self._bins(noise_level)]

    def scale_map(self, noise_level: torch.Tensor | None, eu: torch.Tensor | None, level: float | None = None,
                  intensity: torch.Tensor | None = None) -> torch.Tensor:
        """Std multipliers of ``level`` (default ``reference_level``) for the pixels of EU ``eu`` and mean
        ``intensity`` (both ``[1, X, Y, Z]`` in model units, :func:`eu_in_model_units`, :func:`in_model_units`) in
        slices of noise level ``[Z]``: float64 ``[1, X, Y, Z]``, each pixel the scale of its EU bin within its
        intensity class within its slice's noise bin, divided by the cell's EU-level factor where it has one (see the
        module docstring). Without such bins, or without what they need (``eu`` for EU
        bins, ``intensity`` for classes, ``noise_level`` for noise bins), the per-slice scales of :meth:`scale_at`,
        which broadcast against ``[1, X, Y, Z]``."""
        if (not self.eu_bins or ((self.eu_bin_levels or self.adapts_to_eu_level) and eu is None)
                or (self.intensity_edges and intensity is None) or (self.noise_scales and noise_level is None)):
            return self.scale_at(noise_level, level)
        shape = (eu if eu is not None else intensity).shape
        eu = torch.zeros(shape, dtype=torch.float64) if eu is None else eu.detach().cpu().double()
        level_of_slice = _eu_levels(eu.reshape(-1, shape[-1]).T) if self.adapts_to_eu_level else None
        if self.eu_bin_reference is not None:
            eu = relative_eu(eu, self.eu_bin_reference).double()
        classes = len(self.intensity_edges) + 1
        edges = torch.tensor(self.intensity_edges, dtype=torch.float64)
        tissue = (torch.bucketize(intensity.detach().cpu().double().contiguous(), edges) if self.intensity_edges
                  else torch.zeros(shape, dtype=torch.int64))
        key = str(self.reference_level if level is None else level)
        which = self._bins(noise_level).tolist() if self.noise_scales else [0] * shape[-1]
        scales = torch.empty(shape, dtype=torch.float64)
        for z, b in enumerate(which):
            for c, cell in enumerate(self.eu_bins[b * classes:(b + 1) * classes]):
                per_bin = torch.tensor([s[key] for s in cell["scales"]], dtype=torch.float64)
                if level_of_slice is not None:
                    per_bin = per_bin / _eu_level_factor(cell, level_of_slice[z : z + 1])
                in_class = tissue[..., z] == c
                scales[..., z][in_class] = per_bin[torch.bucketize(eu[..., z][in_class],
                                                                   torch.tensor(cell["edges"], dtype=torch.float64))]
        return scales

    def scales_for(self, outputs: dict[str, torch.Tensor], noise_level: torch.Tensor | None,
                   gain: torch.Tensor | None, offset: torch.Tensor | None, level: float | None = None) -> torch.Tensor:
        """:meth:`scale_map` for a reconstruction's ``mean`` and ``eu`` (``outputs``, ``[1, X, Y, Z]``, physical units;
        ``gain``/``offset`` ``[Z]``: physical = gain * model + offset; ``None``: per-slice scales)."""
        eu = None if gain is None else eu_in_model_units(outputs["eu"].float(), gain)
        intensity = None if gain is None or offset is None else in_model_units(outputs["mean"].float(), gain, offset)
        return self.scale_map(noise_level, eu, level, intensity)

    def _departure_references(self, noise_level: torch.Tensor | None, z: int) -> list[list[float]]:
        """The calibration departures each of ``z`` slices is compared with: its noise bin's, where recorded."""
        if not self.departures:
            raise ValueError("this calibration holds no input departures; refit it with the 'calibrate' run id")
        if not self.noise_departures or noise_level is None:
            return [self.departures] * z
        return [self.noise_departures[b] or self.departures for b in self._bins(noise_level).tolist()]

    def departure_p(self, departure: torch.Tensor, noise_level: torch.Tensor | None = None) -> torch.Tensor:
        """Conformal p-values ``[Z]`` of slices' :func:`input_departure` ``[Z]``: ``(1 + #{calibration slices that
        departed at least as far}) / (n + 1)``, among the calibration slices of each slice's noise bin where
        ``noise_level [Z]`` is given and the bins' departures are recorded; small where unlike calibration."""
        return _p_values(departure, self._departure_references(noise_level, departure.numel()))

    def input_check(self, departure: torch.Tensor, noise_level: torch.Tensor | None = None,
                    alpha: float = INPUT_CHECK_ALPHA) -> dict:
        """The input check of a case from its slices' :func:`input_departure` ``[Z]`` and noise levels ``[Z]``
        (see :meth:`departure_p`): slices at ``p <= alpha`` (or, with fewer than ``1 / alpha - 1`` reference
        slices, beyond all of them) are flagged, and the case is ``input_unlike_calibration`` when its median slice
        is."""
        references = self._departure_references(noise_level, departure.numel())
        p = _p_values(departure, references)
        alpha = max(alpha, 1 / (min(map(len, references)) + 1))
        flagged = (p <= alpha).nonzero().flatten().tolist()
        return {"input_departure_median": float(departure.median()), "input_departure_p": float(p.median()),
                "input_unlike_calibration": bool(p.median() <= alpha), "slices_unlike_calibration": len(flagged),
                "flagged_slices": flagged, "alpha": alpha}

    def eu_threshold_at(self, noise_level: torch.Tensor | None, local: bool = False) -> torch.Tensor:
        """The EU threshold (model units; ``local``: of :func:`local_eu_contrast`) of slices of noise level ``[Z]``:
        ``[Z]`` float64, each slice its noise bin's; a 0-d tensor (the overall threshold) without per-bin thresholds
        or ``noise_level=None``."""
        overall, per_bin = ((self.local_eu_threshold, self.noise_local_eu_thresholds) if local
                             else (self.eu_threshold, self.noise_eu_thresholds))
        if overall is None:
            raise ValueError(f"this calibration holds no {'local ' if local else ''}EU threshold; refit it with the "
                             "'calibrate' run id")
        if not per_bin or noise_level is None:
            return torch.tensor(overall, dtype=torch.float64)
        return torch.tensor(per_bin, dtype=torch.float64)[self._bins(noise_level)]

    def unfamiliar(self, eu: torch.Tensor, gain: torch.Tensor, noise_level: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Pixels whose EU ``[1, X, Y, Z]`` (physical units squared; ``gain`` ``[Z]``: physical units per model unit)
        exceeds the threshold of their slice's noise level ``[Z]`` (:meth:`eu_threshold_at`), or, where the
        calibration records a local threshold, whose :func:`local_eu_contrast` exceeds that: bool, like ``eu``."""
        flagged = eu_in_model_units(eu, gain) > self.eu_threshold_at(noise_level).to(eu.dtype).reshape(1, 1, 1, -1)
        if self.local_eu_threshold is None:
            return flagged
        local = self.eu_threshold_at(noise_level, local=True).float().reshape(1, 1, 1, -1)
        return flagged | (local_eu_contrast(eu, self.local_eu_window) > local)

    def describe(self) -> str:
        """The ``reference_level`` scales in one line: overall, or per noise bin with the bins' ranges (and per
        acceleration)."""
        if self.accelerations:
            return "; ".join(f"at {a}x acceleration, {c.describe()}" for a, c in self.accelerations.items())
        level = f"{self.reference_level:.0%}"
        if self.eu_bins:
            ref, classes = str(self.reference_level), len(self.intensity_edges) + 1
            cells = [" / ".join(f"{s[ref]:.2f}" for s in b["scales"]) for b in self.eu_bins]
            per_bin = "; ".join(" | ".join(cells[i:i + classes]) for i in range(0, len(cells), classes))
            of = "EU" if self.eu_bin_reference is None else f"EU / slice's {self.eu_bin_reference:g} EU quantile"
            splits = ([f"intensity class (the mean cut at {', '.join(f'{e:.3g}' for e in self.intensity_edges)} "
                       "model units; classes apart by |)"] if self.intensity_edges else [])
            splits += ([f"EU bin (cut at its {', '.join(f'{q:g}' for q in self.eu_bin_levels)} quantiles of {of})"]
                       if self.eu_bin_levels else [])
            by_eu = (f"; within {'each noise bin' if self.noise_scales else 'all slices'}, per {' and '.join(splits)}: "
                     f"{per_bin}")
            if self.adapts_to_eu_level:
                exponents = "; ".join(" | ".join(f"{b['eu_level_exponent']:.2f}" for b in self.eu_bins[i:i + classes])
                                      for i in range(0, len(self.eu_bins), classes))
                by_eu += (f"; each cell's scales divided by (slice's EU level / its reference) ** exponent "
                          f"({exponents})")
        else:
            by_eu = ""
        if not self.noise_scales:
            return f"one {level} std scale {self.scale:.2f} for every slice{by_eu}"
        edges = [f"{e:.3g}" for e in self.noise_edges]
        ranges = [f"below {edges[0]}", *[f"{a} to {b}" for a, b in zip(edges, edges[1:], strict=False)],
                  f"{edges[-1]} and above"]
        bins = ", ".join(f"{s[str(self.reference_level)]:.2f} ({r})" for s, r in zip(self.noise_scales, ranges,
                                                                                     strict=True))
        return (f"{level} std scales per noise bin (the network's noise estimate of each slice, model units, "
                f"calibrated on {self.noise_range[0]:.3g} - {self.noise_range[1]:.3g}): {bins}; one scale for all "
                f"would be {self.scale:.2f}{by_eu}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration JSON; a malformed file is an error naming it."""
        try:
            return cls._from_dict(json.loads(Path(path).read_text()))
        except (OSError, TypeError, KeyError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: not a usable Hyper-DM calibration file ({e}); refit it with the 'calibrate' "
                             "run id or set inference_cfg#calibration to null") from e

    @classmethod
    def _from_dict(cls, content: dict) -> Calibration:
        """A checked calibration from its JSON form (its per-acceleration calibrations likewise)."""
        nested = content.pop("accelerations", {})
        calibration = cls(**content, accelerations={key: cls._from_dict(value) for key, value in nested.items()})
        if not (calibration.scale > 0 and math.isfinite(calibration.scale)):
            raise ValueError(f"scale {calibration.scale} is not a positive number")
        if calibration.noise_scales and len(calibration.noise_scales) != len(calibration.noise_edges) + 1:
            raise ValueError(f"{len(calibration.noise_scales)} noise bins but {len(calibration.noise_edges)} "
                             "edges (expected one edge fewer than bins)")
        for threshold in [calibration.eu_threshold, *calibration.noise_eu_thresholds, calibration.local_eu_threshold,
                          *calibration.noise_local_eu_thresholds]:
            if threshold is not None and not (threshold >= 0 and math.isfinite(threshold)):
                raise ValueError(f"EU threshold {threshold} is not a non-negative number")
        for name in ("noise_eu_thresholds", "noise_local_eu_thresholds"):
            per_bin = getattr(calibration, name)
            if per_bin and len(per_bin) != len(calibration.noise_scales):
                raise ValueError(f"{len(per_bin)} noise bins of {name} but {len(calibration.noise_scales)} of scales")
        if calibration.local_eu_threshold is not None and not 0 < (calibration.local_eu_window or 0) <= 1:
            raise ValueError(f"local_eu_window {calibration.local_eu_window} is not a fraction of the slice's side in "
                             "(0, 1]")
        cells = max(1, len(calibration.noise_scales)) * (len(calibration.intensity_edges) + 1)
        if calibration.eu_bins and len(calibration.eu_bins) != cells:
            raise ValueError(f"{len(calibration.eu_bins)} EU-binned cells but {cells} noise bins x intensity classes")
        edges = calibration.intensity_edges
        if edges and not (calibration.eu_bins and intensity_classes_valid(edges)):
            raise ValueError(f"intensity_edges {edges} must be ascending values in (-1, 1) and "
                             "come with eu_bins")
        if calibration.eu_bin_reference is not None and not 0 < calibration.eu_bin_reference < 1:
            raise ValueError(f"eu_bin_reference {calibration.eu_bin_reference} is not a quantile level between 0 and 1")
        for eu_bin in calibration.eu_bins:
            if len(eu_bin["scales"]) != len(eu_bin["edges"]) + 1:
                raise ValueError(f"{len(eu_bin['scales'])} EU bins but {len(eu_bin['edges'])} edges (expected one "
                                 "edge fewer than bins)")
            if "eu_level_exponent" in eu_bin:
                exponent, reference, (low, high) = (eu_bin[k] for k in ("eu_level_exponent", "eu_level_reference",
                                                                        "eu_level_range"))
                if not (math.isfinite(exponent) and exponent <= EU_LEVEL_EXPONENT_MAX and 0 < low <= reference <= high
                        and math.isfinite(high)):
                    raise ValueError(f"EU-level exponent {exponent} (at most {EU_LEVEL_EXPONENT_MAX}) with reference "
                                     f"{reference} in range {[low, high]} (positive, ascending) is not usable")
        if calibration.scale_ratio is not None and not (calibration.scale_ratio > 0
                                                        and math.isfinite(calibration.scale_ratio)):
            raise ValueError(f"scale_ratio {calibration.scale_ratio} is not a positive number")
        if not 0 < calibration.eu_level < 1:
            raise ValueError(f"eu_level {calibration.eu_level} is not a quantile level between 0 and 1")
        if calibration.noise_departures and len(calibration.noise_departures) != len(calibration.noise_scales):
            raise ValueError(f"{len(calibration.noise_departures)} noise bins of input departures but "
                             f"{len(calibration.noise_scales)} of scales")
        for key in nested:
            if not float(key) > 0:
                raise ValueError(f"acceleration {key!r} is not a positive number")
        return calibration


def fit_calibration(residuals: Sequence[torch.Tensor], noise_levels: Sequence[torch.Tensor] | None = None,
                    bins: int = 1, checkpoint_sha256: str = "", levels: Sequence[float] = LEVELS,
                    reference_level: float = 0.9, departures: Sequence[torch.Tensor] = (),
                    accelerations: Sequence[float] = (), acceleration_groups: Sequence[float] = (),
                    eu: Sequence[torch.Tensor] = (), sampling: dict[str, int | str] | None = None,
                    scale_ratios: Sequence[float] = (), eu_bin_levels: Sequence[float] = (),
                    local_eu: Sequence[torch.Tensor] = (), local_eu_window: float = LOCAL_EU_WINDOW,
                    means: Sequence[torch.Tensor] = (), intensity_edges: Sequence[float] = (),
                    eu_level: bool = False) -> Calibration:
    """Split-conformal std scales (see the module docstring) from per-case standardised residuals ``[Z, P]`` and,
    for ``bins > 1``, the cases' per-slice noise levels ``[Z]`` (at most one bin per slice); ``departures``: the
    cases' per-slice :func:`input_departure` ``[Z]`` to keep; ``eu``: the cases' pixels' EU in model units ``[Z, P]``
    (:func:`slice_samples` of :func:`eu_in_model_units`) for :attr:`Calibration.eu_threshold` (with bins, also each
    bin's); ``local_eu`` (with ``eu``): the same pixels' :func:`local_eu_contrast` with ``local_eu_window`` ``[Z, P]``
    for :attr:`Calibration.local_eu_threshold`; ``eu_bin_levels`` (with ``eu``): split each noise bin's pixels at
    these quantiles of their EU over their slice's :data:`LOCAL_EU_REFERENCE` quantile (each row's, an estimate of
    :func:`relative_eu`), each EU bin with its own scales (:attr:`Calibration.eu_bins`); ``intensity_edges``
    (with ``means``, the same pixels' mean in model units ``[Z, P]``, :func:`in_model_units`): first split each noise
    bin's pixels into intensity classes where their mean crosses these values (model units,
    :attr:`Calibration.intensity_edges`), each class with its own scales and EU bins; ``eu_level`` (with ``eu``):
    each such cell's scales also follow the slices' EU level (see the module docstring); ``sampling``: how
    the cases were reconstructed (:attr:`Calibration.sampling`); ``scale_ratios``: MRI,
    ``(mask acceleration, magnitude scale over the zero-filled image's)`` of each case measured for
    :attr:`Calibration.scale_ratio` (any cases: it needs no reconstruction). With two
    or more ``acceleration_groups`` (MRI: the nominal accelerations calibrated on) each case joins the group nearest
    its mask's measured acceleration (``accelerations``, one per case) and every group also gets a calibration of
    its own."""
    if len(acceleration_groups) > 1:
        if len(accelerations) != len(residuals):
            raise ValueError(f"{len(acceleration_groups)} acceleration groups need one measured acceleration per "
                             f"case, got {len(accelerations)} for {len(residuals)} cases")
        fitted = fit_calibration(residuals, noise_levels, bins, checkpoint_sha256, levels, reference_level,
                                 departures, eu=eu, sampling=sampling, scale_ratios=scale_ratios,
                                 eu_bin_levels=eu_bin_levels, local_eu=local_eu, local_eu_window=local_eu_window,
                                 means=means, intensity_edges=intensity_edges, eu_level=eu_level)
        keys = [f"{a:g}" for a in acceleration_groups]
        for key in keys:
            members = [i for i, a in enumerate(accelerations) if _nearest(keys, a) == key]
            if not members:
                raise ValueError(f"no calibration case has a mask near {key}x acceleration (measured: "
                                 f"{sorted(round(a, 2) for a in accelerations)})")
            fitted.accelerations[key] = group = fit_calibration(
                [residuals[i] for i in members], None if noise_levels is None else [noise_levels[i] for i in members],
                bins, checkpoint_sha256, levels, reference_level,
                [departures[i] for i in members] if departures else (), eu=[eu[i] for i in members] if eu else (),
                sampling=sampling, scale_ratios=[r for r in scale_ratios if _nearest(keys, r[0]) == key],
                eu_bin_levels=eu_bin_levels, local_eu=[local_eu[i] for i in members] if local_eu else (),
                local_eu_window=local_eu_window, means=[means[i] for i in members] if means else (),
                intensity_edges=intensity_edges, eu_level=eu_level)
            group.acceleration = float(key)
        return fitted
    if reference_level not in levels:
        raise ValueError(f"reference_level {reference_level} must be one of the levels {list(levels)}")
    if eu_bin_levels and (not eu or list(eu_bin_levels) != sorted(set(eu_bin_levels))
                          or not all(0 < q < 1 for q in eu_bin_levels)):
        raise ValueError(f"eu_bin_levels {list(eu_bin_levels)} must be ascending quantile levels in (0, 1), with the "
                         "cases' EU samples to split")
    if intensity_edges and (not means or not intensity_classes_valid(intensity_edges)):
        raise ValueError(f"intensity_edges {list(intensity_edges)} must be ascending values of the mean in (-1, 1) "
                         "(model units), with the cases' mean samples to split")
    if bins > 1 and (noise_levels is None or len(noise_levels) != len(residuals)):
        raise ValueError(f"{bins} noise bins need one noise-level tensor per case, got "
                         f"{None if noise_levels is None else len(noise_levels)} for {len(residuals)} cases")
    per_slice = [row.double() for x in residuals for row in torch.atleast_2d(x)]  # one row per slice
    r = torch.cat(per_slice).sort().values if per_slice else torch.empty(0)
    if r.numel() == 0:
        raise ValueError("no residuals to calibrate on (no validation case with a reference?)")
    raw = {str(level): float((r <= central_z(level)).double().mean()) for level in levels}
    calibration = Calibration(scales=_scales(r, levels), n_pixels=r.numel(), n_cases=len(residuals),
                              checkpoint_sha256=checkpoint_sha256, reference_level=reference_level, raw_coverage=raw,
                              sampling=dict(sampling or {}))
    if eu:
        if len(eu) != len(residuals):
            raise ValueError(f"{len(eu)} cases of EU samples for {len(residuals)} cases of residuals")
        eu_rows = [row.float() for e in eu for row in torch.atleast_2d(e)]  # one row per slice, as ``per_slice``
        if len(eu_rows) != len(per_slice):
            raise ValueError(f"EU samples of {len(eu_rows)} slices for residuals of {len(per_slice)} slices")
        calibration.eu_threshold = _eu_quantile(eu_rows, calibration.eu_level)
    if local_eu:
        local_rows = [row.float() for e in local_eu for row in torch.atleast_2d(e)]
        if not eu or len(local_rows) != len(per_slice):
            raise ValueError(f"local EU contrast samples of {len(local_rows)} slices need EU samples of the same "
                             f"{len(per_slice)} slices as the residuals")
        calibration.local_eu_window = float(local_eu_window)
        calibration.local_eu_threshold = _eu_quantile(local_rows, calibration.eu_level)
    if scale_ratios:
        ratios = torch.tensor([float(r) for _, r in scale_ratios], dtype=torch.float64)
        calibration.scale_ratio = float(ratios.median())
        calibration.scale_ratio_range = [float(ratios.min()), float(ratios.max())]
    rounded = lambda d: [float(f"{x:.4g}") for x in d.sort().values.tolist()]  # noqa: E731
    departure = torch.cat([d.double().flatten() for d in departures]) if departures else None
    if departure is not None:
        calibration.departures = rounded(departure)
    if bins > 1:
        noise = torch.cat([n.double().flatten() for n in noise_levels])
        order = noise.argsort()
        bins = min(bins, noise.numel())
        cuts = [round(noise.numel() * j / bins) for j in range(1, bins)]
        calibration.noise_edges = sorted({float((noise[order[c - 1]] * noise[order[c]]).sqrt()) for c in cuts})
        which = torch.bucketize(noise, torch.tensor(calibration.noise_edges, dtype=torch.float64))
        members = [(which == b).nonzero().flatten().tolist() for b in range(len(calibration.noise_edges) + 1)]
        calibration.noise_scales = [_scales(torch.cat([per_slice[i] for i in m]).sort().values, levels) if m
                                    else dict(calibration.scales) for m in members]  # a bin of ties only: overall
        calibration.noise_range = [float(noise.min()), float(noise.max())]
        if departure is not None:
            if departure.numel() != noise.numel():
                raise ValueError(f"{departure.numel()} input departures for {noise.numel()} slices' noise levels")
            calibration.noise_departures = [rounded(departure[m]) for m in members]
        if eu:
            calibration.noise_eu_thresholds = [_eu_quantile([eu_rows[i] for i in m], calibration.eu_level) if m
                                               else calibration.eu_threshold for m in members]
        if local_eu:
            calibration.noise_local_eu_thresholds = [
                _eu_quantile([local_rows[i] for i in m], calibration.eu_level) if m
                else calibration.local_eu_threshold for m in members]
    if eu_level and not eu:
        raise ValueError("eu_level needs the cases' EU samples (their slices' EU levels)")
    if eu_bin_levels or intensity_edges or eu_level:
        every_slice = range(len(per_slice))  # what an empty noise bin (ties only) takes, as for its scales
        relative = [row for e in eu for row in _over_row_quantile(torch.atleast_2d(e))] if eu_bin_levels else None
        if eu_bin_levels:
            calibration.eu_bin_levels = [float(q) for q in eu_bin_levels]
            calibration.eu_bin_reference = LOCAL_EU_REFERENCE
        mean_rows = [row.double() for m in means for row in torch.atleast_2d(m)] if intensity_edges else None
        if intensity_edges:
            if len(mean_rows) != len(per_slice):
                raise ValueError(f"mean samples of {len(mean_rows)} slices for residuals of {len(per_slice)} slices")
            calibration.intensity_edges = [float(e) for e in intensity_edges]
        calibration.eu_bins = [
            cell for rows in ((m or every_slice) for m in (members if bins > 1 else [every_slice]))
            for cell in _class_cells(rows, per_slice, relative, mean_rows, calibration.intensity_edges, eu_bin_levels,
                                     levels, torch.cat([_eu_levels(torch.atleast_2d(e)) for e in eu]) if eu_level
                                     else None, reference_level)]
    if eu:  # the share of each case's pixels flagged, as inference flags them
        case_noise = [n.double().flatten() for n in noise_levels] if bins > 1 else [None] * len(eu)

        def flagged(samples: Sequence[torch.Tensor], local: bool) -> list[torch.Tensor]:
            return [torch.atleast_2d(x).double() > calibration.eu_threshold_at(n, local).reshape(-1, 1)
                    for x, n in zip(samples, case_noise, strict=True)]

        cases = flagged(eu, False)
        if local_eu:
            cases = [a | b for a, b in zip(cases, flagged(local_eu, True), strict=True)]
        calibration.eu_flagged_max = max(float(f.double().mean()) for f in cases)
    return calibration


def intensity_classes_valid(edges: Sequence[float]) -> bool:
    """Whether ``edges`` can cut intensity classes: values of the mean ascending strictly within the model's range
    (-1, 1)."""
    return list(edges) == sorted(set(edges)) and all(-1 < e < 1 for e in edges)


def _eu_levels(rows: torch.Tensor) -> torch.Tensor:
    """Each slice's EU level, the :data:`EU_LEVEL_QUANTILE` quantile of its row of ``rows`` ``[Z, P]`` (EU, model
    units): float64 ``[Z]``."""
    return rows.float().quantile(EU_LEVEL_QUANTILE, dim=1).double()


def _eu_level_factor(cell: dict, levels: torch.Tensor) -> torch.Tensor | float:
    """What a cell's residuals are multiplied by (and its scales divided by) for slices of EU level ``levels``
    ``[Z]``: ``(level / reference) ** exponent``, the level clipped to the cell's calibrated range; 1 for a cell
    that does not adapt to the EU level."""
    if "eu_level_exponent" not in cell:
        return 1.0
    low, high = cell["eu_level_range"]
    return (levels.clamp(low, high) / cell["eu_level_reference"]) ** cell["eu_level_exponent"]


def _fit_eu_level(residual_rows: Sequence[torch.Tensor], levels: torch.Tensor, level: float) -> dict:
    """A cell's ``eu_level_exponent``, ``eu_level_reference`` and ``eu_level_range`` from its slices' residuals
    (each ``[P_i]``, the cell's pixels of one slice) and EU levels ``[S]``: minus the least-squares slope of the
    log ``level`` quantile of each slice's residuals on its log EU level (slices with 20 pixels or more and both
    positive), between 0 and :data:`EU_LEVEL_EXPONENT_MAX`; 0 where fewer than three such slices or one level."""
    quantiles = torch.tensor([float(r.float().quantile(level)) if r.numel() >= 20 else 0.0 for r in residual_rows],
                             dtype=torch.float64)
    usable = (quantiles > 0) & (levels > 0)
    x, y = levels[usable].log(), quantiles[usable].log()
    by_y = y.argsort(stable=True)  # sums in one order whatever the order of the cases: the same fit when joined
    by_x = x[by_y].argsort(stable=True)
    x, y = x[by_y][by_x], y[by_y][by_x]
    if x.numel() < 3 or float(x.var()) == 0:
        return {"eu_level_exponent": 0.0, "eu_level_reference": 1.0, "eu_level_range": [1.0, 1.0]}
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return {"eu_level_exponent": min(EU_LEVEL_EXPONENT_MAX, max(0.0, -slope)),
            "eu_level_reference": float(x.mean().exp()),
            "eu_level_range": [float(x.min().exp()), float(x.max().exp())]}


def _quantile_edges(values: torch.Tensor, bin_levels: Sequence[float]) -> list[float]:
    """Bin edges at the ``bin_levels`` quantiles of ``values`` (any shape), ascending, ties merged."""
    if not bin_levels:
        return []  # no sort of millions of pixels for nothing
    ranked = values.flatten().double().sort().values
    return sorted({float(ranked[min(ranked.numel() - 1, int(q * ranked.numel()))]) for q in bin_levels})


def _class_cells(rows: Sequence[int], residual_rows: Sequence[torch.Tensor],
                 relative_rows: Sequence[torch.Tensor] | None, mean_rows: Sequence[torch.Tensor] | None,
                 intensity_edges: Sequence[float], bin_levels: Sequence[float], levels: Sequence[float],
                 eu_levels: torch.Tensor | None = None, reference_level: float = 0.9) -> list[dict]:
    """The :attr:`Calibration.eu_bins` entries of one noise bin (slices ``rows``), one per intensity class: each
    ``{"edges", "scales"}``, the class's EU edges at ``bin_levels`` of its pixels' relative EU (ties merged) and each
    EU bin's split-conformal scales (an empty class or EU bin takes the scales of the pixels around it); with the
    slices' EU levels ``eu_levels`` (``[slices]``, all rows) also the class's fit to them (:func:`_fit_eu_level` at
    ``reference_level``), its residuals scaled by it before the scales are fitted."""
    pick = lambda samples: torch.cat([samples[i] for i in rows])  # noqa: E731
    r = pick(residual_rows)
    e = pick(relative_rows).double() if bin_levels else torch.zeros_like(r)
    tissue = (torch.bucketize(pick(mean_rows), torch.tensor(intensity_edges, dtype=torch.float64))
              if intensity_edges else torch.zeros(r.shape, dtype=torch.int64))
    sizes = [residual_rows[i].numel() for i in rows]
    slice_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    cell_levels = None if eu_levels is None else eu_levels[list(rows)]
    cells = []
    for c in range(len(intensity_edges) + 1):
        in_class = tissue == c
        fit = {}
        if eu_levels is not None:
            fit = _fit_eu_level([x[m] for x, m in zip(r.split(sizes), in_class.split(sizes), strict=True)],
                                cell_levels, reference_level)
            r = torch.where(in_class, r * _eu_level_factor(fit, cell_levels)[slice_of], r)
        r_c, e_c = (r[in_class], e[in_class]) if bool(in_class.any()) else (r, e)
        edges = _quantile_edges(e_c, bin_levels)
        which = torch.bucketize(e_c, torch.tensor(edges, dtype=torch.float64))
        pooled = _scales(r_c.sort().values, levels)
        cells.append({"edges": edges, "scales": [_scales(r_c[which == b].sort().values, levels)
                                                  if bool((which == b).any()) else pooled
                                                  for b in range(len(edges) + 1)], **fit})
    return cells


def _eu_quantile(rows: Sequence[torch.Tensor], level: float) -> float:
    """The split-conformal ``level`` quantile of the EU samples of the slices ``rows`` (each ``[P]``)."""
    pooled = torch.cat(list(rows))
    return float(pooled.kthvalue(_conformal_rank(pooled.numel(), level)).values)


def holdout_coverage(residuals: Sequence[torch.Tensor], noise_levels: Sequence[torch.Tensor],
                     eu: Sequence[torch.Tensor], patients: Sequence[str], bins: int = 1,
                     eu_bin_levels: Sequence[float] = (), level: float = 0.9, means: Sequence[torch.Tensor] = (),
                     intensity_edges: Sequence[float] = (), eu_level: bool = False) -> list[tuple[float, float, float]]:
    """How a calibration carries to a patient it never saw: for each patient, :func:`fit_calibration` on the other
    patients' cases (residuals ``[Z, P]``, noise levels ``[Z]``, EU ``[Z, P]`` and means ``[Z, P]`` as for it) and, on
    each of its own cases, the fraction of pixels its calibrated central ``level`` interval covers, the same among
    the case's 10% of pixels with the highest EU and, with ``means``, among its tissue (mean above
    :data:`TISSUE_FLOOR`; ``nan`` without ``means``); ``eu_level``: scales that follow the slices' EU level, as
    :func:`fit_calibration`'s. ``patients``: one name per case (a patient's cases: its
    measurements). Returns ``(coverage, highest-EU tenth, tissue)`` per case, in order."""
    if not len(residuals) == len(noise_levels) == len(eu) == len(patients) or len(set(patients)) < 2:
        raise ValueError(f"holdout needs one noise level, EU and patient per case and two patients or more, got "
                         f"{len(residuals)} cases, {len(set(patients))} patient(s)")
    if means and len(means) != len(residuals):
        raise ValueError(f"{len(means)} cases of mean samples for {len(residuals)} cases of residuals")
    z, out = central_z(level), [None] * len(residuals)
    pick = lambda x, cases: [x[i] for i in cases] if x else ()  # noqa: E731
    as_volume = lambda x: x.T[None]  # noqa: E731  [Z, P] -> [1, P, Z]
    for patient in dict.fromkeys(patients):
        keep = [i for i, p in enumerate(patients) if p != patient]
        calibration = fit_calibration(pick(residuals, keep), pick(noise_levels, keep), bins, levels=(level,),
                                      reference_level=level, eu=pick(eu, keep), eu_bin_levels=eu_bin_levels,
                                      means=pick(means, keep), intensity_edges=intensity_edges, eu_level=eu_level)
        for i in (i for i, p in enumerate(patients) if p == patient):
            scale = calibration.scale_map(noise_levels[i], as_volume(eu[i]), intensity=as_volume(means[i]) if means
                                          else None)
            covered = residuals[i] <= z * scale.broadcast_to(as_volume(eu[i]).shape)[0].T
            top = eu[i] >= eu[i].float().quantile(0.9)
            tissue = float(covered[means[i] > TISSUE_FLOOR].double().mean()) if means else math.nan
            out[i] = (float(covered.double().mean()), float(covered[top].double().mean()), tissue)
    return out
