"""The pass framework: what a pass is, how pipelines run, how rewrites are written.

* :mod:`~passes.framework.base`: :class:`Pass`, :class:`PassContext`, :class:`PassResult`;
* :mod:`~passes.framework.manager`: :class:`PassManager` (verification, timing, reproducers);
* :mod:`~passes.framework.pipeline`: pipeline strings, parsed in one place;
* :mod:`~passes.framework.registry`: ``@register_pass`` and discovery of the pass packages;
* :mod:`~passes.framework.rewriter`: :class:`Rewriter`, through which every mutation goes;
* :mod:`~passes.framework.rules`: :class:`Rule`, :class:`NoMatch` and the one greedy driver;
* :mod:`~passes.framework.pattern`: the pattern language (:class:`PatternRule`);
* :mod:`~passes.framework.match`: public matching helpers (producers, constants, operand orders);
* :mod:`~passes.framework.evaluator` and :mod:`~passes.framework.numerics`: evaluating ops and
  running models in onnxruntime, for folding, probes and verification.
"""
