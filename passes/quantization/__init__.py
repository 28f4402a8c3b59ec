"""Per-op quantization under an accuracy budget: the pass, its calibration, math and sensitivity analysis."""
