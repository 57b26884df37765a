"""Named quantization methods: each is a set of switches that the stages read.

Configs as data, in the manner of torchao's presets: a stage asks ``METHODS[name].les`` instead of
comparing method names, so an ablation is one more entry here, not a branch in every stage.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    les: bool  # learned equivalent scaling (gamma); off means gamma = 1
    adaround: bool  # learned rounding; off means nearest rounding
    pts: bool  # power-of-two scaling with voting; off means k = 0 everywhere
    split: bool  # separate quantizers for the two halves of decoder skip concatenations
    weighting: str  # timestep weighting of the LES loss: uniform | linear | focal

    def weight_switches(self, recon_weighted: bool) -> tuple:
        """The switches that shape this method's weights (LES, its weighting, AdaRound, split): two
        methods with equal switches make bit-identical weights and share one les + recon chain. The
        weighting counts only where a loss uses it (LES, or reconstruction with ``recon.weighting:
        method``); PTS acts on activations only."""
        weighted = self.les or (recon_weighted and self.adaround)
        return (self.les, self.weighting if weighted else None, self.adaround, self.split)


METHODS: dict[str, Method] = {
    "minmax": Method(les=False, adaround=False, pts=False, split=False, weighting="uniform"),
    "qdiff": Method(les=False, adaround=True, pts=False, split=True, weighting="uniform"),
    "dmq": Method(les=True, adaround=True, pts=True, split=True, weighting="focal"),
    "dmq-no-les": Method(les=False, adaround=True, pts=True, split=True, weighting="focal"),
    "dmq-no-pts": Method(les=True, adaround=True, pts=False, split=True, weighting="focal"),
    "dmq-uniform": Method(les=True, adaround=True, pts=True, split=True, weighting="uniform"),
    "dmq-linear": Method(les=True, adaround=True, pts=True, split=True, weighting="linear"),
}
