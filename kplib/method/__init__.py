"""The method layer: KPL's stages and its baselines on plain tensors (no files, no models, no figures).

Stage 1 :mod:`~kplib.method.text_proxy`, stage 2 :mod:`~kplib.method.transport` and :mod:`~kplib.method.proxy`,
the methods behind one interface :mod:`~kplib.method.methods`, :mod:`~kplib.method.metrics` and the simulator
:mod:`~kplib.method.simulate`.
"""
