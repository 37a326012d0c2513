"""segany inside the annotation tools people already use: ``segany serve`` answers Label
Studio's ML backend, CVAT's interactor and X-AnyLabeling's remote server contracts from one
process, one model and one embedding cache (docs/cvat.md, docs/xanylabeling.md).

- :mod:`.core`: :class:`~.core.ModelSession` (the shared model, cache and settings), image
  decoding, mask -> polygon;
- :mod:`.app`: the FastAPI app (fixed prefixes, guards, token, logs) and ``serve()``;
- :mod:`.cvat`, :mod:`.xanylabeling` (and ``labelstudio``): one module per tool contract;
- :mod:`.cli`: ``segany serve``.

Importing this package imports nothing else.
"""
