"""The data engine: a web annotator with the model in the loop (stages 1 and 2 of the paper).

- :mod:`.store`: SQLAlchemy schema and queries (SQLite by default, PostgreSQL by URL).
- :mod:`.service`: one method per annotator action, typed requests and responses.
- :mod:`.server`: the FastAPI app (thin routes) and ``serve()`` (uvicorn).
- :mod:`.stats`: the paper's measurements (seconds and clicks per mask, masks per image).
- ``web/``: the browser UI (plain HTML/JS, no external assets).

Importing this package does not import FastAPI; ``segany annotate`` is the entry point.
"""
