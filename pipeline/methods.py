"""Named quantization methods: each is a set of switches that the stages read.

Configs as data, in the manner of torchao's presets: a stage asks ``METHODS[name].les`` instead of
comparing method names, so an ablation is one more entry here, not a branch in every stage.
"""

from __future__ import annotations

from dataclasses import dataclass

SHORTCUT = ("conv_shortcut",)  # where Q-Diffusion and the DMQ code split: the skip concatenation's 1x1 shortcut
SHORTCUT_AND_CONV1 = ("conv1", "conv_shortcut")  # ours before 2026-12: the decoder's first conv too


@dataclass(frozen=True)
class Method:
    les: bool  # learned equivalent scaling (gamma); off means gamma = 1
    adaround: bool  # learned rounding; off means nearest rounding
    pts: bool  # power-of-two scaling with voting; off means k = 0 everywhere
    split: tuple[str, ...]  # decoder layers whose concat(h, skip) input gets a quantizer per half
    weighting: str  # timestep weighting of the LES loss: uniform | linear | focal
    shared_acts: bool = False  # one set of activation parameters for all steps (Q-Diffusion), else one per step
    attention: bool = False  # the attention matmuls quantized by default (Q-Diffusion's paper; DMQ's code does not)

    def weight_switches(self, recon_weighted: bool) -> tuple:
        """The switches that shape this method's weights (LES, its weighting, AdaRound, split): two
        methods with equal switches make bit-identical weights and share one les + recon chain. The
        weighting counts only where a loss uses it (LES, or reconstruction with ``recon.weighting:
        method``); PTS and the activation parameters act on activations only."""
        weighted = self.les or (recon_weighted and self.adaround)
        return (self.les, self.weighting if weighted else None, self.adaround, self.split)


METHODS: dict[str, Method] = {
    "minmax": Method(les=False, adaround=False, pts=False, split=(), weighting="uniform"),
    "qdiff": Method(
        les=False, adaround=True, pts=False, split=SHORTCUT, weighting="uniform", shared_acts=True, attention=True
    ),
    "qdiff-steps": Method(les=False, adaround=True, pts=False, split=SHORTCUT, weighting="uniform", attention=True),
    "qdiff-steps-conv1": Method(
        les=False, adaround=True, pts=False, split=SHORTCUT_AND_CONV1, weighting="uniform", attention=True
    ),
    "dmq": Method(les=True, adaround=True, pts=True, split=SHORTCUT, weighting="focal"),
    "dmq-no-les": Method(les=False, adaround=True, pts=True, split=SHORTCUT, weighting="focal"),
    "dmq-no-pts": Method(les=True, adaround=True, pts=False, split=SHORTCUT, weighting="focal"),
    "dmq-uniform": Method(les=True, adaround=True, pts=True, split=SHORTCUT, weighting="uniform"),
    "dmq-linear": Method(les=True, adaround=True, pts=True, split=SHORTCUT, weighting="linear"),
}
