"""Code that runs inside the serving runtime rather than in the platform's own processes.

``triton_model.py`` is copied verbatim into every published Triton model version as
``model.py``; it deliberately imports nothing from ``recsys`` so a version folder is
self-contained and keeps serving even when the platform code changes underneath it.
"""
