"""DMQ post-training quantization of diffusion models, as a library the DVC stages call.

The public API (:mod:`pipeline.api`, docs in README "Quantize your own model"): :func:`quantize` a
diffusers model with a :class:`Config` (params.yaml's sections; :func:`preset` makes one) on a
:class:`Calibration`, then :func:`save` and :func:`load` the portable checkpoint.

Subpackages by role; imports flow one way, left to right (``tests/test_architecture.py`` checks it;
docs/architecture.md describes each role):

    infra -> quant -> models -> calibration -> method -> eval, deploy -> resources -> preflight, api

``config`` (the params schema) and ``methods`` (the method presets) are data that any layer may
read; ``preflight`` checks a config against the model before a stage starts, and ``api`` runs the
method from Python, so both sit on top.
"""

__all__ = ["Calibration", "Config", "load", "preset", "quantize", "save"]


def __getattr__(name: str):
    # Imported on first use: the stages import submodules of this package, and the API's imports
    # (torch, diffusers, every phase) would slow down the ones that need none of them.
    if name in __all__:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
