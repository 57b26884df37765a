"""DMQ post-training quantization of diffusion models, as a library the DVC stages call.

Subpackages by role; imports flow one way, left to right (``tests/test_architecture.py`` checks it;
docs/architecture.md describes each role):

    infra -> quant -> models -> calibration -> method -> eval, deploy

``config`` (the params schema) and ``methods`` (the method presets) are data that any layer may
read; ``preflight`` checks a config against the model before a stage starts, so it sits on top.
"""
