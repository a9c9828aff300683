"""A worked example: a digits classifier served end to end (the README's walkthrough).

scikit-learn's ``load_digits()`` data set (8 x 8 images of handwritten digits, shipped inside
scikit-learn, no download) and a random forest trained when each replica starts. The modules:

- :mod:`examples.digits.model`: the ``POST /predict`` backend, a class trained at startup. Its
  ``async def __call__`` reads and checks the body ``{"pixels": [64 numbers from 0 to 16]}`` (a
  client error, 400 or 422, otherwise) and awaits its sync ``@serve.batch`` method, which labels
  up to 32 images per ``predict`` call on the replica's thread.
- :mod:`examples.digits.preprocess`: the checks and the scaling of an image.
- :mod:`examples.digits.typed_api`: the same model behind a typed FastAPI app, through a handle.
- :mod:`examples.digits.deployment`: ``setup(serve)``, which wires them: two model versions behind
  one endpoint at ``POST /predict``, 90 % / 10 %, and the typed API at ``/api``;
  ``examples/digits/deployment.toml`` declares the same deployment.
- :mod:`examples.digits.fastapi_app`: the same deployment inside a FastAPI app.
- :mod:`examples.digits.client`: sends images the model never saw and reports accuracy, the split
  between versions and the mean batch size.

From the repository root::

    aioserve run examples.digits.deployment:setup
    curl -X POST http://127.0.0.1:8000/predict -d @examples/digits/zero.json
    python -m examples.digits.client
"""
